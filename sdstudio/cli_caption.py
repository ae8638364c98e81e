"""``sdstudio caption DIR``: a caption file beside each image (a CLIP interrogator: BLIP's caption when
BLIP weights are given, then phrases ranked by CLIP), arguments to :mod:`sdstudio.eval.captions`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdstudio.errors import SdStudioError

__all__ = ["add_caption_commands", "cmd_caption"]


def cmd_caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from sdstudio.eval.captions import CaptionerSpec, CaptionFolderRequest, caption_folder, load_captioner

    request = CaptionFolderRequest(
        folder=args.folder, mode=args.mode, overwrite=args.overwrite, append_tags=args.append_tags,
        extension=args.caption_extension, batch_size=args.batch_size, prefix=args.prefix, postfix=args.postfix,
        replace=tuple(_replacement(r) for r in args.replace),
    )  # fmt: skip
    if not Path(args.folder).is_dir():
        raise SdStudioError(f"{args.folder}: no such folder")
    spec = CaptionerSpec(
        clip=args.clip, blip=args.blip, phrases=tuple(args.phrases),
        builtin_phrases=False if args.no_builtin_phrases else (True if args.builtin_phrases else None),
        toy_model=args.toy_model, toy_pair=args.toy_pair,
    )  # fmt: skip
    captioner = load_captioner(spec)
    bar = tqdm(disable=args.quiet, file=sys.stderr, desc="captions", unit="image")

    def progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    with bar:
        result = caption_folder(request, captioner, progress)
    print(result.summary(), flush=True)
    return 0


def _replacement(text: str) -> tuple[str, str]:
    old, sep, new = text.partition("=")
    if not sep:
        raise SdStudioError(f"--replace {text!r}: give OLD=NEW (--replace purple=pink)")
    return old, new


def add_caption_commands(top_sub: argparse._SubParsersAction) -> None:
    cap = top_sub.add_parser(
        "caption",
        help="write a caption .txt beside each image of a folder (BLIP + CLIP-ranked phrases)",
        description="Caption the images of DIR for training: BLIP's caption when --blip is given, then "
        "phrases from the phrase lists ranked by CLIP similarity with the image. With no --clip, the toy "
        "world's CLIP pair reads colour, shape, size, position and background of toy-world images. "
        "Existing captions are kept unless --overwrite or --append-tags.",
    )
    cap.add_argument("folder", metavar="DIR", help="folder of images (.png .jpg .jpeg .webp .bmp)")
    cap.add_argument("--clip", metavar="FILE", help="a whole CLIP file (OpenAI, open_clip or transformers layout); "
                     "default: the toy world's CLIP pair")  # fmt: skip
    cap.add_argument("--blip", metavar="DIR", help="a BLIP captioning folder (transformers layout, e.g. "
                     "blip-image-captioning-base) for the base caption; needs pip install 'sdstudio[caption]'")  # fmt: skip
    cap.add_argument("--mode", default="best", choices=("fast", "classic", "best"),
                     help="classic: the best phrase of each list (3 flavours); fast: the most similar phrases "
                     "that fit 75 tokens; best (default): phrases chained while they raise the similarity")  # fmt: skip
    cap.add_argument("--phrases", action="append", default=[], metavar="PATH",
                     help="a phrase list (.txt, one phrase a line) or a folder of them; repeatable; a list named "
                     "like a built-in one (mediums, movements, flavors) replaces it")  # fmt: skip
    grp = cap.add_mutually_exclusive_group()
    grp.add_argument("--builtin-phrases", action="store_true",
                     help="rank the built-in lists with the toy pair too (on by default with --clip)")  # fmt: skip
    grp.add_argument("--no-builtin-phrases", action="store_true", help="leave the built-in lists out")
    cap.add_argument("--append-tags", action="store_true",
                     help="add the new caption's comma-separated parts to an existing caption")  # fmt: skip
    cap.add_argument("--overwrite", action="store_true", help="replace existing captions")
    cap.add_argument("--prefix", default="", metavar="TEXT",
                     help="put TEXT before every caption written, as it is (a trigger word: --prefix 'sks, ')")
    cap.add_argument("--postfix", default="", metavar="TEXT", help="put TEXT after every caption written")
    cap.add_argument("--replace", action="append", default=[], metavar="OLD=NEW",
                     help="replace the word OLD by NEW (whole words, case-sensitive) in every caption written (repeatable): the captioner's "
                     "name for your concept by your own word (--replace purple=pink)")
    cap.add_argument(
        "--caption-extension", default=".txt", metavar="EXT", help="caption file extension (default .txt)"
    )
    cap.add_argument("--batch-size", type=int, default=16, help="images encoded at once (default 16)")
    cap.add_argument(
        "--toy-model", metavar="FILE", help="toy pair: the toy-world model whose text encoder it uses"
    )
    cap.add_argument("--toy-pair", metavar="FILE", help="toy pair: its image side (a clip_pair.safetensors of "
                     "`sdstudio train toyworld --stage clip`)")  # fmt: skip
    cap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cap.set_defaults(func=cmd_caption)
