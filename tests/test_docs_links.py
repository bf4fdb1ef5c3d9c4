"""Every in-repository pointer to a documentation anchor resolves.

Code comments cite official behaviour as `docs/fidelity.md#<anchor>`, and the docs link to each
other with `[text](file.md#anchor)`; a renamed heading would silently break them. Anchors follow
GitHub's rule: the heading text lower-cased, punctuation dropped, spaces turned into '-'.
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules"}
# `docs/<name>.md#<anchor>` anywhere in a source or doc file.
CODE_REF = re.compile(r"\bdocs/([\w.-]+\.md)#([\w-]+)")
# Markdown links inside docs/: `](<name>.md#<anchor>)` or `](#<anchor>)`.
MD_LINK = re.compile(r"\]\(([\w./-]*?\.md)?#([\w-]+)\)")


def _files(suffixes):
  for path in ROOT.rglob("*"):
    if path.suffix in suffixes and path.is_file() and not SKIP_DIRS & set(path.parts):
      yield path


def anchors(md: pathlib.Path) -> set[str]:
  """GitHub anchors of the headings of a markdown file (code blocks ignored)."""
  out, seen, in_code = set(), {}, False
  for line in md.read_text(encoding="utf-8").splitlines():
    if line.startswith("```"):
      in_code = not in_code
    m = None if in_code else re.match(r"#{1,6} (.*)", line)
    if m:
      slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
      n = seen.get(slug, 0)
      seen[slug] = n + 1
      out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def test_code_and_doc_pointers_resolve():
  cache, broken = {}, []
  for path in _files({".py", ".md", ".toml", ".cfg", ".txt"}):
    text = path.read_text(encoding="utf-8", errors="replace")
    refs = [(ROOT / "docs" / name, a) for name, a in CODE_REF.findall(text)]
    if path.suffix == ".md":
      refs += [((path.parent / name) if name else path, a) for name, a in MD_LINK.findall(text)]
    for target, anchor in refs:
      target = target.resolve()
      if target not in cache:
        cache[target] = anchors(target) if target.exists() else None
      if cache[target] is None or anchor not in cache[target]:
        broken.append(f"{path.relative_to(ROOT)}: {target.relative_to(ROOT)}#{anchor}")
  assert not broken, "broken documentation pointers:\n  " + "\n  ".join(sorted(set(broken)))


def test_fidelity_anchors_are_unique():
  text = (ROOT / "docs" / "fidelity.md").read_text(encoding="utf-8")
  slugs = [
    re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
    for h in re.findall(r"^#{1,6} (.*)$", text, re.M)
  ]
  dups = sorted({s for s in slugs if slugs.count(s) > 1})
  assert not dups, f"duplicate headings in docs/fidelity.md: {dups}"
