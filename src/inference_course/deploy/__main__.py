"""``python -m inference_course.deploy base | context DIR [--model] | build [--target T]``: the image steps of
vLLM Lab 2.4 from a shell (the notebook calls the same functions)."""
from __future__ import annotations

import argparse

from . import images


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m inference_course.deploy", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("base", help=f"make {images.BASE_IMAGE} with debootstrap unless podman has it")
    context = sub.add_parser("context", help="write a build context for docker/Dockerfile.service")
    context.add_argument("folder")
    context.add_argument("--model", action="store_true", help="add the embedded model (for --target baked)")
    build = sub.add_parser("build", help="base image, context and `podman build` of the service image")
    build.add_argument("--target", default="runtime", choices=("runtime", "baked"))
    build.add_argument("--tag", help=f"default {images.SERVICE_IMAGE} (runtime) or ...-baked")
    args = parser.parse_args(argv)

    if args.command == "base":
        seconds = images.ensure_base_image()
        print(f"{images.BASE_IMAGE}: " + (f"made in {seconds:.0f} s" if seconds else "already there"))
    elif args.command == "context":
        print(images.build_context(args.folder, model=_model() if args.model else None))
    else:
        result = images.ensure_service_image(target=args.target, tag=args.tag)
        how = ("reused: an image built from the same inputs was there" if result.reused
               else f"built in {result.seconds:.0f} s")
        print(f"{result.tag} ({result.target}): {result.size_bytes / 1e9:.2f} GB, {how}")


def _model():
    from ..models import ensure_embedded_model

    return ensure_embedded_model()


if __name__ == "__main__":
    main()
