"""``harness images``: build guest images and show what an image holds."""

from __future__ import annotations

import argparse
from typing import Any

from harness.cli import command, emit_json, register_parser
from harness.errors import ConfigError


@register_parser
def _add_images(sub: Any) -> None:
    p = sub.add_parser("images", help="build and inspect guest images (guests/recipes)")
    isub = p.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="build images (default: every recipe); prints each image dir")
    b.add_argument("names", nargs="*", metavar="NAME", help="recipe names")
    b.add_argument(
        "--refresh",
        action="store_true",
        help="resolve the recipes' packages against Debian's archive again",
    )
    s = isub.add_parser("show", help="describe an image (building it if needed)")
    s.add_argument("name", metavar="NAME")
    s.add_argument("--json", action="store_true", help="print JSON")
    isub.add_parser("list", help="list the recipes")


@command("images")
def _images(args: argparse.Namespace) -> int:
    from harness import images

    action = args.images_command
    if action == "list":
        for name in images.list_images():
            print(name)
        return 0
    if action == "build":
        names = args.names or images.list_images()
        known = set(images.list_images())
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(
                f"no image recipe {', '.join(unknown)}; available: {', '.join(sorted(known))}"
            )
        for name in names:
            print(images.ensure_image(name, refresh=args.refresh).root)
        return 0
    image = images.ensure_image(args.name)
    if args.json:
        emit_json(image.to_json())
        return 0
    for key, value in image.to_json().items():
        if key == "packages":
            value = ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
        print(f"{key}: {value}")
    return 0
