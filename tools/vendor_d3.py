"""
Fetch d3 from the npm registry into gelutrace/report/vendor/ (the viewer pages inline it; nothing is fetched when a
page is viewed): its dist build d3.min.js, its LICENSE, and d3.json recording the name, version, tarball URL and the
tarball's sha256. Without --update, the tarball must match the sha256 recorded (a check that the vendored files are
the registry's); with --update VERSION, that version is fetched and recorded.

    python tools/vendor_d3.py                  # re-fetch the recorded version, check its sha256, rewrite the files
    python tools/vendor_d3.py --update 7.9.0   # vendor another version
"""

import argparse
import hashlib
import io
import json
import tarfile
import urllib.request
from pathlib import Path

VENDOR = Path(__file__).resolve().parent.parent / "gelutrace" / "report" / "vendor"
RECORD = VENDOR / "d3.json"
REGISTRY = "https://registry.npmjs.org/d3/-/d3-{version}.tgz"
MEMBERS = {"package/dist/d3.min.js": "d3.min.js", "package/LICENSE": "d3.LICENSE"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update", metavar="VERSION", help="vendor this version instead of checking the recorded one")
    args = ap.parse_args()
    record = json.loads(RECORD.read_text()) if RECORD.is_file() else None
    version = args.update or (record or {}).get("version")
    if version is None:
        raise SystemExit(f"error: {RECORD} does not exist: give --update VERSION")
    url = REGISTRY.format(version=version)
    with urllib.request.urlopen(url, timeout=60) as r:
        tarball = r.read()
    digest = hashlib.sha256(tarball).hexdigest()
    if args.update is None and digest != record["sha256"]:
        raise SystemExit(f"error: {url} has sha256 {digest}, but {RECORD} records {record['sha256']}")
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        files = {name: tar.extractfile(member).read() for member in tar.getmembers()
                 if (name := MEMBERS.get(member.name)) is not None}
    if len(files) != len(MEMBERS):
        raise SystemExit(f"error: {url} lacks {sorted(set(MEMBERS.values()) - set(files))}")
    for name, data in files.items():
        (VENDOR / name).write_bytes(data)
    RECORD.write_text(json.dumps({"name": "d3", "version": version, "license": "ISC", "tarball": url,
                                  "sha256": digest, "file": "d3.min.js",
                                  "file_sha256": hashlib.sha256(files["d3.min.js"]).hexdigest()}, indent=2) + "\n")
    print(f"d3 {version} ({digest}) in {VENDOR}")


if __name__ == "__main__":
    main()
