"""
Compare two runs' dataset directories file by file, as a restructuring must leave them: every CSV, JSON, Markdown
and stamp file equal once the checkout path, timestamps, run ids and uids are normalised; other files by sha256.

    python tools/compare_runs.py OLD_DIR NEW_DIR OLD_CHECKOUT NEW_CHECKOUT [--ignore_keys k1 k2 ...]

--ignore_keys: JSON keys a change added on purpose (left out of the comparison). Exit status 1 when anything
differs.
"""

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

VOLATILE = re.compile(r"(time|duration|seconds|elapsed|created|date|_at$|uid|^run$|mtime)", re.I)
UID = re.compile(r"\.v[0-9a-f]{12}")


def normalised(x, root: str, ignore: set):
    if isinstance(x, dict):
        return {k: ("<volatile>" if VOLATILE.search(k) else normalised(v, root, ignore))
                for k, v in x.items() if k not in ignore}
    if isinstance(x, list):
        return [normalised(v, root, ignore) for v in x]
    if isinstance(x, str):
        return UID.sub(".v<uid>", x.replace(root, "<ROOT>"))
    return x


def content(p: Path, root: str, ignore: set):
    if p.name.endswith("manifest.json"):  # its sha256s cover files whose paths and ids differ: compared one by one
        return normalised({k: v for k, v in json.loads(p.read_text()).items() if k != "files"}, root, ignore)
    if p.suffix == ".json":
        return normalised(json.loads(p.read_text()), root, ignore)
    if p.suffix in (".csv", ".md", ".run", ".cmd", ".el", ".txt"):
        text = UID.sub(".v<uid>", p.read_text(errors="replace").replace(root, "<ROOT>"))
        if p.suffix == ".csv":
            text = re.sub(r",[0-9a-f]{32}$", ",<uid>", text, flags=re.M)  # a run id column (store_uid)
        return re.sub(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(:\d\d)?\S*", "<date>", text) if p.suffix == ".md" else text
    return hashlib.sha256(p.read_bytes()).hexdigest()


def files(d: Path) -> dict:
    return {UID.sub(".v<uid>", str(p.relative_to(d))): p for p in d.rglob("*")
            if p.is_file() and not p.name.endswith(".lock")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("old", "new", "old_checkout", "new_checkout"):
        ap.add_argument(name)
    ap.add_argument("--ignore_keys", nargs="*", default=[])
    a = ap.parse_args()
    old, new, ignore = files(Path(a.old)), files(Path(a.new)), set(a.ignore_keys)
    common = sorted(set(old) & set(new))
    differ = [k for k in common if content(old[k], a.old_checkout, ignore) != content(new[k], a.new_checkout, ignore)]
    print(f"compared {len(common)} files; only old: {len(set(old) - set(new))}; only new: {len(set(new) - set(old))}; "
          f"differing: {len(differ)}")
    for k in sorted(set(old) - set(new)):
        print("  only old:", k)
    for k in sorted(set(new) - set(old)):
        print("  only new:", k)
    for k in differ:
        print("  differs:", k)
    return 1 if differ or set(old) != set(new) else 0


if __name__ == "__main__":
    sys.exit(main())
