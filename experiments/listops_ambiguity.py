"""How often dropping ] (data.tokenizer="lra") leaves a ListOps label undetermined.

(A) Collisions: generated expressions whose "lra" tokens equal another expression's
    "lra" tokens while the labels differ.
(B) Re-bracketing: for each generated expression, every single move of one ] that
    keeps the "lra" tokens and stays a tree LRA's generator could have made (2..10
    arguments per operator, depth <= 10); the expression is ambiguous when one such
    reading has another value. A lower bound: only one-] moves are tried.

  python experiments/listops_ambiguity.py > experiments/results/cpu/listops_ambiguity.txt
"""
import collections
import sys

import numpy as np

from effx.data import listops

NAMES = listops.token_names()
MAX_ARGS, MAX_DEPTH = 10, 10


def collisions(settings):
  splits = listops.generate(settings)
  groups = collections.defaultdict(set)
  count = 0
  for expressions, labels in splits.values():
    for e, label in zip(expressions, labels):
      groups[listops.tokenize(e, "lra").tobytes()].add(int(label))
      count += 1
  ambiguous = sum(1 for labels in groups.values() if len(labels) > 1)
  return count, len(groups), ambiguous


class Node:
  def __init__(self, op, depth):
    self.op, self.depth, self.children, self.parent = op, depth, [], None


def parse(tokens):
  pos = 0
  def node(depth):
    nonlocal pos
    name = NAMES[tokens[pos]]
    pos += 1
    if name.isdigit():
      return int(name)
    n = Node(name, depth)
    while NAMES[tokens[pos]] != "]":
      child = node(depth + 1)
      if isinstance(child, Node):
        child.parent = n
      n.children.append(child)
    pos += 1
    return n
  root = node(1)
  assert pos == len(tokens)
  return root


def value(n):
  if isinstance(n, int):
    return n
  if not hasattr(n, "value"):
    n.value = listops.apply_operator(n.op, [value(c) for c in n.children])
  return n.value


def height(n):
  return 1 if isinstance(n, int) else 1 + max(height(c) for c in n.children)


def root_value_after(p, new_p_value):
  """Root value when node ``p``'s value becomes ``new_p_value`` (others unchanged)."""
  child, v = p, new_p_value
  while child.parent is not None:
    parent = child.parent
    vals = [v if c is child else value(c) for c in parent.children]
    child, v = parent, listops.apply_operator(parent.op, vals)
  return v


def readings(root):
  """Values of the trees one ] move away with the same "lra" tokens."""
  out = set()
  stack = [root]
  while stack:
    p = stack.pop()
    kids = p.children
    stack.extend(c for c in kids if isinstance(c, Node))
    for i, c in enumerate(kids):
      if not isinstance(c, Node):
        continue
      vals = [value(k) for k in kids]
      # C swallows its next sibling S (C's ] moves right past S)
      if i + 1 < len(kids) and len(c.children) < MAX_ARGS and len(kids) > 2:
        s = kids[i + 1]
        if c.depth + height(s) <= MAX_DEPTH:
          new_c = listops.apply_operator(c.op, [value(k) for k in c.children] + [value(s)])
          new_p = listops.apply_operator(p.op, vals[:i] + [new_c] + vals[i + 2:])
          out.add(root_value_after(p, new_p))
      # C's last child L leaves C (C's ] moves left before L)
      if len(c.children) > 2 and len(kids) < MAX_ARGS:
        last = c.children[-1]
        new_c = listops.apply_operator(c.op, [value(k) for k in c.children[:-1]])
        new_p = listops.apply_operator(p.op, vals[:i] + [new_c, value(last)] + vals[i + 1:])
        out.add(root_value_after(p, new_p))
  return out


def rebracketing(settings):
  splits = listops.generate(settings)
  expressions = [e for s in splits.values() for e in s[0]]
  labels = np.concatenate([s[1] for s in splits.values()])
  ambiguous, other_values = 0, []
  for e, label in zip(expressions, labels):
    root = parse(e.tolist())
    assert value(root) == label
    values = readings(root) - {int(label)}
    ambiguous += bool(values)
    other_values.append(len(values))
  return len(expressions), ambiguous, float(np.mean(other_values))


def main():
  sys.setrecursionlimit(10_000)
  print("(A) collisions: expressions, distinct lra sequences, lra sequences with >1 label")
  for lo, hi, n in [(3, 12, 5000), (8, 64, 5000), (16, 128, 5000), (500, 2000, 3000)]:
    s = listops.Settings(min_length=lo, max_length=hi, num_train=n, num_valid=0, num_test=0,
                         seed=0)
    print(f"  lengths ({lo}, {hi}):", collisions(s))
  print("(B) one-] re-bracketings: expressions, ambiguous, mean other values per expression")
  for lo, hi, n in [(8, 64, 3000), (16, 128, 3000), (500, 2000, 3000)]:
    s = listops.Settings(min_length=lo, max_length=hi, num_train=n, num_valid=0, num_test=0,
                         seed=0)
    print(f"  lengths ({lo}, {hi}):", rebracketing(s))


if __name__ == "__main__":
  main()
