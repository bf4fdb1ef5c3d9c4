"""Process inspection through /proc, for tests that check worker processes die with their parent."""

import os


def children(pid: int) -> list[int]:
  """Pids whose parent is `pid`."""
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          fields = f.read().rsplit(")", 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        out.append(int(entry))
  return out


def alive(pid: int) -> bool:
  """True while `pid` exists and has not exited (a zombie has exited)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False
