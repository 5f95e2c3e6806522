"""What every part of effx shares: logical axis names (``axes``), local and bucket
paths (``files``), the config-section rule (``schema``)."""
