"""Names the image of a commit and pins an overlay to it: the tag carries the commit the image is built
from, so a node never runs stale or mixed code under a reused tag.

    python infra/docker/pin_image.py infra/k8s/overlays/gpu [--registry REGISTRY] [--digest sha256:...]

Prints the image reference to build and push, and writes it into the overlay's one ``images:`` entry
(``flava-ray``). The working tree must be clean (the image is built from it), except infra/k8s, which
is not in the build context: the rewritten kustomizations do not change the image. With ``--digest``
(after the push) the overlay references the pushed image by its digest instead of its tag.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "flava-ray"


def head_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    dirty = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!infra/k8s").strip()
    if dirty:  # infra/k8s is outside the build context (.dockerignore): pinning one overlay, then another
        raise SystemExit(f"pin_image: the working tree has changes; commit them first:\n{dirty}")
    return git("rev-parse", "HEAD").strip()


def image_tag(commit: str, platform: str) -> str:
    """``<version>-g<commit>-ray<ray>-<python tag>-<cpu|gpu>``: the version, the commit, and what
    tests/infra checks against the pins (Ray, Python, platform)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (ray,) = [d.split("==")[1] for d in project["dependencies"] if re.match(r"ray(\[.*\])?==", d)]
    minor = re.search(r">=\s*3\.(\d+)", project["requires-python"])[1]
    return f"{project['version']}-g{commit[:12]}-ray{ray}-py3{minor}-{platform}"


def pin(kustomization: Path, name: str, tag: str = "", digest: str = "") -> None:
    """Rewrites the ``flava-ray`` entry of ``images:``: newName, newTag and, given, the digest (which
    kustomize then uses instead of the tag)."""
    text = kustomization.read_text()
    entry = re.search(rf"^  - name: {IMAGE}\b.*\n((?:    .*\n)*)", text, flags=re.M)
    if entry is None:
        raise SystemExit(f"pin_image: {kustomization} has no images: entry for {IMAGE}")
    fields = f"    newName: {name}\n    newTag: {tag}\n" + (f"    digest: {digest}\n" if digest else "")
    kustomization.write_text(text[: entry.start(1)] + fields + text[entry.end(1) :])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlay", type=Path, help="e.g. infra/k8s/overlays/gpu")
    parser.add_argument("--registry", default="", help="e.g. registry.example.com/team")
    parser.add_argument("--digest", default="", help="sha256:... of the pushed image")
    args = parser.parse_args(argv)
    kustomization = args.overlay / "kustomization.yaml"
    current = re.search(r"newTag: \S+-(cpu|gpu)\b", kustomization.read_text())
    if current is None:
        raise SystemExit(f"pin_image: {kustomization} names no -cpu or -gpu tag for {IMAGE}")
    if args.digest and not re.fullmatch(r"sha256:[0-9a-f]{64}", args.digest):
        raise SystemExit(f"pin_image: --digest {args.digest!r} is not sha256:<64 hex digits>")
    name = f"{args.registry.rstrip('/')}/{IMAGE}" if args.registry else IMAGE
    tag = image_tag(head_commit(), current[1])
    pin(kustomization, name, tag, args.digest)
    print(f"{name}:{tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
