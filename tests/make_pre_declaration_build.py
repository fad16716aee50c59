"""Make a build as shardkit wrote it before manifests declared their sample format.

The shards of such a build are byte for byte what today's build writes; its manifest lacks the
``sample_format`` declaration. Run on a fresh build of the toy dataset:

    python tests/make_pre_declaration_build.py OUTPUT DEST
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


def make_pre_declaration_build(build: Path, dest: Path) -> Path:
    shutil.copytree(build, dest)
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    manifest.pop("sample_format", None)
    manifest_path.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return dest


if __name__ == "__main__":
    make_pre_declaration_build(Path(sys.argv[1]), Path(sys.argv[2]))
