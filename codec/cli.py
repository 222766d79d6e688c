"""``aeic``: the codec command line (encode, decode, info, export, relevel, interpolate,
set-rounding, eval).

``encode`` runs the sender path (onnxruntime + numpy, no torch); ``decode`` the receiver path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard, TypeVar

from aeic.sender.coding_scale import parse_downscale
from aeic.sender.rate_distortion_rounding import parse_rounding
from aeic.shared.decode_limits import TILE_PIXELS
from aeic.shared.model_package import MANIFEST, ModelPackageError, default_model_dir

_Codec = TypeVar("_Codec")


class _Unloadable(Exception):
    """A model package (or the SD-Turbo folder it needs) that cannot be loaded: one line, exit status 2."""


def _open_model(load: Callable[[], _Codec]) -> _Codec:
    """``load()``, its failures one line: weights that do not fit (an SD-Turbo folder of another model) or a
    damaged manifest. A sealed package of another version is the loaders' own ModelPackageError."""
    try:
        return load()
    except ModelPackageError:
        raise
    except ValueError as exc:
        raise _Unloadable(str(exc)) from exc


def cmd_encode(args: argparse.Namespace) -> int:
    from aeic.sender.encoder import BudgetError, SenderCodec
    from aeic.sender.images import ImageReadError, open_image

    problem = _encode_output_problem(args.images, args.output)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    codec = _open_model(lambda: SenderCodec.from_package(args.model, threads=args.threads, downscale=args.downscale,
                                                         rounding=args.rounding))
    status = 0
    for image in args.images:
        try:
            picture = open_image(image)  # read strip by strip as it is coded: never whole as an array too
            height, width, _ = picture.shape
            start = time.perf_counter()
            if args.target_bytes is not None:
                data, level = codec.encode_to_budget(picture, args.target_bytes)
            else:
                level = args.rate
                data = codec.encode(picture, level)
            del picture  # the decoded photo (192 MB at 48 MP) goes before the next one is read
        except ImageReadError as exc:  # its message already names the file
            print(exc, file=sys.stderr)
            status = 1
            continue
        except (OSError, ValueError, BudgetError) as exc:
            print(f"{image}: {exc}", file=sys.stderr)
            status = 1
            continue
        elapsed = (time.perf_counter() - start) * 1e3
        out = _encoded_path(image, args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        bpp = len(data) * 8 / (height * width)
        print(f"{image} -> {out}: {len(data)} bytes, {bpp:.4f} bpp, level {level}, {elapsed:.0f} ms")
    return status


# Far above any real stream (0.16 bpp at 16384x16384 is 5.4 MB): a bound so that a wrong path (a disk
# image, /dev/zero) gives an error instead of filling the memory.
MAX_STREAM_BYTES = 64 * 1024 * 1024


def _read_stream(path: Path) -> bytes:
    """The file's bytes, or ValueError when it is too large to be a bitstream."""
    with path.open("rb") as file:
        data = file.read(MAX_STREAM_BYTES + 1)
    if len(data) > MAX_STREAM_BYTES:
        raise ValueError(f"larger than {MAX_STREAM_BYTES:,} bytes: not an AEIC bitstream")
    return data


def _clash(inputs: list[Path], outputs: list[Path]) -> str | None:
    """Two inputs that would be written to one file (``a/photo.png`` and ``b/photo.png`` into one folder,
    ``photo.png`` and ``photo.jpg`` beside each other): the second overwrote the first without a word."""
    first_for: dict[Path, Path] = {}
    for source, out in zip(inputs, outputs, strict=True):
        first = first_for.setdefault(out.resolve(), source)
        if first.resolve() != source.resolve():  # the same input given twice writes the same bytes: no harm
            return f"{first} and {source} would both be written to {out}: give them separate output folders"
    return None


def _names_a_stream(output: Path | None) -> TypeGuard[Path]:
    """``encode -o x.aeic`` means that file, as ``decode -o x.png`` does; it made a folder called x.aeic."""
    return output is not None and output.suffix.lower() == ".aeic" and not output.is_dir()


def _encoded_path(image: Path, output: Path | None) -> Path:
    """``-o`` as the stream itself, or the folder to write ``<image>.aeic`` in (default: beside the image)."""
    if _names_a_stream(output):
        return output
    return (output / image.with_suffix(".aeic").name) if output else image.with_suffix(".aeic")


def _encode_output_problem(images: list[Path], output: Path | None) -> str | None:
    """Why ``-o`` cannot take these images' streams (a file, one stream for several, two streams on one
    path), before the model loads; None when it can."""
    if _names_a_stream(output) and len(images) > 1:
        return f"-o {output} names one stream, but {len(images)} images were given; give a folder"
    if output is not None and output.exists() and not output.is_dir() and not _names_a_stream(output):
        return f"-o {output} is a file: give a folder, or a .aeic file for one image"
    return _clash(images, [_encoded_path(image, output) for image in images])


_PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _names_a_picture(output: Path | None) -> TypeGuard[Path]:
    """``-o x.png`` means that file, not a folder called x.png (the old reading surprised users)."""
    return output is not None and output.suffix.lower() in _PICTURE_SUFFIXES and not output.is_dir()


def _names_another_picture_format(output: Path | None) -> bool:
    """``-o x.gif`` (or .bmp, .tif, ...): a picture format decode does not write. Taken as a folder, it made
    a folder called x.gif with the PNG inside; it is refused instead."""
    if output is None or output.is_dir() or _names_a_picture(output):
        return False
    from PIL import Image

    known = set(Image.registered_extensions()) | {".avif", ".jxl", ".heic", ".heif"}
    return output.suffix.lower() in known


def _decoded_path(stream: Path, output: Path | None) -> Path:
    """``-o`` as the picture itself, or the folder to write ``<stream>.png`` in (default: beside the stream)."""
    if _names_a_picture(output):
        return output
    return (output / stream.with_suffix(".png").name) if output else stream.with_suffix(".png")


_DECODED_BY = "aeic decode"  # the PNG Software text of a decoded picture: one decode may replace it


def _decode_mark() -> Any:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", _DECODED_BY)
    return info


def _an_earlier_decode(path: Path) -> bool:
    """``aeic encode photo.png`` then ``aeic decode photo.aeic`` wrote the decoded picture over the original
    photo: a PNG is replaced unasked only when an earlier decode wrote it (re-running a decode still works)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.format == "PNG" and image.info.get("Software") == _DECODED_BY
    except (OSError, ValueError):  # a folder, an unreadable or foreign file: not ours
        return False


def _decode_output_problem(streams: list[Path], output: Path | None) -> str | None:
    """Why ``-o`` cannot take these streams' pictures (a file or a format decode does not write, one picture
    for several, two pictures on one path, a photo that is not an earlier decode's), before the model loads;
    None when it can."""
    if _names_a_picture(output) and len(streams) > 1:
        return f"-o {output} names one picture, but {len(streams)} streams were given; give a folder"
    if _names_another_picture_format(output):
        return f"-o {output}: decode writes {', '.join(_PICTURE_SUFFIXES)} pictures; name one of those, or a folder"
    if output is not None and output.exists() and not output.is_dir() and not _names_a_picture(output):
        return f"-o {output} is a file: give a folder, or a {'/'.join(_PICTURE_SUFFIXES)} file for one stream"
    paths = [_decoded_path(stream, output) for stream in streams]
    clash = _clash(streams, paths)
    if clash:
        return clash
    kept = [path for path in paths if not _names_a_picture(output) and path.exists() and not _an_earlier_decode(path)]
    if kept:
        return (f"{kept[0]} exists and is not a picture aeic decode wrote (the original photo?): give -o a folder, "
                f"or -o {kept[0]} to replace it")
    return None


def cmd_decode(args: argparse.Namespace) -> int:
    import torch
    from aeic.receiver.decoder import ReceiverCodec, UnknownModelError
    from aeic.shared.bitstream import BitstreamError
    from aeic.shared.entropy_coding import EntropyDecodeError
    from PIL import Image

    problem = _decode_output_problem(args.streams, args.output)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    codec = _open_model(lambda: ReceiverCodec.from_package(args.model, device=args.device, tile_pixels=args.tile_pixels,
                                                           dtype=args.decoder_dtype))
    status = 0
    for stream in args.streams:
        try:
            start = time.perf_counter()
            rgb = codec.decode(_read_stream(stream))
        except UnknownModelError as exc:  # the ids alone do not say which package was used, or what to do
            print(f"{stream}: {exc} ({args.model or default_model_dir()}): decode it with --model naming the package "
                  "it was made with", file=sys.stderr)  # fmt: skip
            status = 1
            continue
        except (OSError, BitstreamError, EntropyDecodeError, ValueError) as exc:
            print(f"{stream}: {exc}", file=sys.stderr)
            status = 1
            continue
        except torch.OutOfMemoryError:  # a large picture on a small GPU (the SD-Turbo decoder): the next may fit
            print(f"{stream}: out of {codec.device.type} memory; a smaller --tile-pixels (now {args.tile_pixels}) "
                  "renders it in smaller passes", file=sys.stderr)  # fmt: skip
            torch.cuda.empty_cache()
            status = 1
            continue
        out = _decoded_path(stream, args.output)
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(out, **({"pnginfo": _decode_mark()} if out.suffix.lower() == ".png" else {}))
        print(f"{stream} -> {out}: {rgb.shape[1]}x{rgb.shape[0]}, {(time.perf_counter() - start) * 1e3:.0f} ms")
    return status


def cmd_info(args: argparse.Namespace) -> int:
    from aeic.shared.bitstream import BitstreamError, unpack

    status = 0
    for stream in args.streams:
        try:
            data = _read_stream(stream)
            parsed = unpack(data)
        except (OSError, BitstreamError, ValueError) as exc:
            print(f"{stream}: {exc}", file=sys.stderr)
            status = 1
            continue
        header = parsed.header
        info = {
            "file": str(stream),
            "bytes": len(data),
            "width": header.width,
            "height": header.height,
            "bpp": round(len(data) * 8 / (header.width * header.height), 5),
            "model_id": header.model_id.hex(),
            "rate_index": header.rate_index,
            "downscale": header.downscale,
            "grey": header.grey,
            "colour_stats": header.colour_stats,
            "payload_bytes": len(parsed.payload),
        }
        print(json.dumps(info))
    return status


def _check_out(out: Path) -> None:
    """A package goes into a folder: a file there is refused before any work is done."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder: give a new or existing folder for the package")


def _write_package(out: Path, make: Callable[[Path], object]) -> Path:
    """Run ``make(staging)``, which writes a whole package into a new folder beside ``out``, then move
    its files into ``out`` (the manifest last). A failure while writing (a full disk, a bad input)
    leaves ``out`` as it was, an earlier package in it included, and no half-written package."""
    _check_out(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
    except OSError as exc:  # an unwritable place: named as the package, not as the hidden staging folder
        raise OSError(f"cannot write the package to {out}: {exc.strerror or exc}") from exc
    try:
        try:
            make(staging)
        except OSError as exc:  # a full disk, a quota: name the package, and say that nothing changed
            raise OSError(f"cannot write the package for {out}: {exc.strerror or exc}; {out} is unchanged") from exc
        if not out.exists():
            staging.rename(out)
            return out
        written = sorted(staging.iterdir(), key=lambda path: path.name == MANIFEST)  # the manifest seals the rest
        for path in written:
            path.replace(out / path.name)
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cmd_export(args: argparse.Namespace) -> int:
    from .checkpoint import CheckpointError, load_checkpoint_model, load_fitting, read_checkpoint
    from .export import export_package, export_receiver_update, export_sender_update

    try:
        _check_out(args.out)
        state = read_checkpoint(args.checkpoint, needs=("model",))
        if state.get("stage") == "decoder":  # a decoder-only fine-tune: the sender files stay those of its package
            from aeic.receiver.decoder import load_receiver_model
            from aeic.shared.model_package import ModelPackage

            package = ModelPackage.load(_fine_tuned_package(state, args.checkpoint))
            receiver = load_receiver_model(package)
            load_fitting(receiver, state["model"], args.checkpoint)
            out = _write_package(args.out, lambda staging: export_receiver_update(package.path, receiver, staging))
        elif state.get("stage") == "encoder":  # a sender-only fine-tune: tables, levels and receiver stay its package's
            trained = _fine_tuned_package(state, args.checkpoint)
            model = load_checkpoint_model(args.checkpoint)
            out = _write_package(args.out, lambda staging: export_sender_update(trained, model, staging))
        else:
            model = load_checkpoint_model(args.checkpoint)
            out = _write_package(args.out, lambda staging: export_package(model, staging))
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"{out}: model {manifest['name']} id {manifest['model_id']}")
    return 0


def _fine_tuned_package(state: dict, checkpoint: Path) -> Path:
    """The package a decoder- or encoder-stage checkpoint fine-tuned, as its config named it; a relative
    name is relative to the folder the training ran in, so export from elsewhere says so."""
    recorded = Path(state["package"])
    if (recorded / MANIFEST).is_file():
        return recorded
    where = "" if recorded.is_absolute() else f" from {Path.cwd()} (the path is relative to the folder training ran in)"
    raise ValueError(f"{checkpoint} fine-tuned the package {recorded}, which is not found{where}")


def _rewrite_package(out: Path, make: Callable[[Path], Path], detail: Callable[[dict], str]) -> int:
    """Run a package-to-package command into ``out`` (written whole or not at all, see ``_write_package``);
    a ValueError (not a package, a bad setting) is exit status 2."""
    try:
        out = _write_package(out, make)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = json.loads((out / "manifest.json").read_text())
    print(f"{out}: model {manifest['name']} id {manifest['model_id']}, {detail(manifest)}")
    return 0


def cmd_relevel(args: argparse.Namespace) -> int:
    from .rate_levels import relevel_package

    return _rewrite_package(args.out, lambda out: relevel_package(args.package, out, args.per_step),
                            lambda manifest: f"{len(manifest['rate_levels'])} rate levels")


def cmd_interpolate(args: argparse.Namespace) -> int:
    from .interpolation import interpolate_receivers

    return _rewrite_package(args.out, lambda out: interpolate_receivers(args.first, args.second, args.weight, out),
                            lambda _: f"receiver {args.weight:g} of the way to {args.second}")


def cmd_set_rounding(args: argparse.Namespace) -> int:
    from .rounding_setting import set_rounding_weight

    weight = None if args.weight == "nearest" else args.weight
    return _rewrite_package(args.out, lambda out: set_rounding_weight(args.package, out, weight),
                            lambda _: f"rounding {args.weight}")


def _rounding_weight(text: str) -> float | str:
    """``nearest`` or a positive weight; ``package`` means nothing here, where the package's weight is being set."""
    if text == "package":
        raise argparse.ArgumentTypeError("expected nearest or a positive number: a package names its own weight")
    try:
        return parse_rounding(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected nearest or a positive number, got {text!r}") from None


def _positive_bytes(text: str) -> int:
    """A byte budget of at least one byte. ``--target-bytes 0`` (a tiny image's 0.01 bpp rounded down) was
    taken as no budget at all and coded at level 0, a stream over it; ``aeic-send`` refused it already."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"a byte budget is at least 1, got {value}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``minimum`` (a thread count of -3 or a tile of -5 pixels
    was taken, then failed, or not, deep inside the codec)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"at least {minimum}, got {value}")
        return value

    return parse


def _decode_device(text: str) -> str:
    """``auto``, or a torch device this machine has: ``--device cuda`` without a GPU (or ``cuda:3`` with
    one) was a traceback from inside torch after the command had started."""
    if text == "auto":
        return text
    try:
        import torch
    except ModuleNotFoundError:  # decode names the missing receiver extra when it runs
        return text
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    backend: Any = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu: each says if it runs here
    if device.type != "cpu" and not (hasattr(backend, "is_available") and backend.is_available()):
        raise argparse.ArgumentTypeError(f"{text}: this machine's torch has no {device.type} device")
    count = backend.device_count() if device.index is not None and hasattr(backend, "device_count") else None
    if count is not None and device.index is not None and device.index >= count:
        raise argparse.ArgumentTypeError(f"{text}: this machine has {count} {device.type} device(s)")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aeic", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    encode = sub.add_parser("encode", help="images -> .aeic bitstreams (sender path)")
    encode.add_argument("images", nargs="+", type=Path)
    encode.add_argument("-o", "--output", type=Path,
                        help="output folder, or for one image a .aeic file (default: beside each image)")
    rate = encode.add_mutually_exclusive_group()
    # The same default as `aeic-send encode` (aeic.sender.cli.DEFAULT_RATE), so both front ends of the sender
    # path code an image to the same bitstream (not imported: it would load the uploader for `aeic info`).
    rate.add_argument("--rate", type=int, default=0, help="rate level (bitstream rate index; default 0)")
    rate.add_argument("--target-bytes", type=_positive_bytes, help="the largest bitstream allowed, bytes")
    encode.add_argument("--model", type=Path, help="model package folder (default: the shipped one)")
    encode.add_argument("--threads", type=_at_least(1), help="onnxruntime threads (default: its own)")
    encode.add_argument("--downscale", type=parse_downscale, default="auto", metavar="{auto,1,2,4}",
                        help="code the image reduced by this factor, the decoder scales back "
                             "(auto: by image and budget size)")
    encode.add_argument("--rounding", type=parse_rounding, default="package", metavar="{package,nearest,W}",
                        help="symbol rounding: the package's rate-distortion weight, nearest, or a weight")
    decode = sub.add_parser("decode", help=".aeic bitstreams -> PNG, or the picture -o names (receiver path)")
    decode.add_argument("streams", nargs="+", type=Path)
    decode.add_argument("-o", "--output", type=Path,
                        help="output folder, or for one stream a .png/.jpg/.webp file (default: beside each stream); "
                             "a file there is replaced only if aeic decode wrote it or -o names it")
    decode.add_argument("--model", type=Path, help="model package folder (default: the shipped one)")
    decode.add_argument("--device", type=_decode_device, default="auto",
                        help="auto (a GPU when torch has one), cpu, cuda or cuda:N")
    decode.add_argument("--tile-pixels", type=_at_least(64 * 64), default=TILE_PIXELS, metavar="N",
                        help="padded coded pixels the pixel decoder renders in one pass; a larger picture is "
                             f"rendered in tiles, bounding memory (default {TILE_PIXELS}: a 1080p photo coded "
                             "whole is one pass)")
    # the receiver's `decoder_dtype` (not imported from it: that would load torch for `aeic info`)
    decode.add_argument("--decoder-dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="what a full-profile package's SD-Turbo UNet and VAE compute in: half precision halves "
                             "their memory (float16 needs a GPU); nano packages ignore it")
    info = sub.add_parser("info", help="print the header of bitstreams as JSON")
    info.add_argument("streams", nargs="+", type=Path)
    export = sub.add_parser("export", help="training checkpoint -> model package")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("out", type=Path)
    relevel = sub.add_parser("relevel", help="model package -> the same weights with more (or fewer) rate levels")
    relevel.add_argument("package", type=Path)
    relevel.add_argument("out", type=Path)
    relevel.add_argument("--per-step", type=int, default=16, help="levels per step between trained rate points")
    interpolate = sub.add_parser(
        "interpolate", help="two packages with the same sender -> one whose receiver weights lie between theirs"
    )
    interpolate.add_argument("first", type=Path)
    interpolate.add_argument("second", type=Path)
    interpolate.add_argument("out", type=Path)
    interpolate.add_argument("--weight", type=float, default=0.5, help="0 gives the first receiver, 1 the second")
    set_rounding = sub.add_parser(
        "set-rounding", help="model package -> the same package naming its sender's rate-distortion rounding weight"
    )
    set_rounding.add_argument("package", type=Path)
    set_rounding.add_argument("out", type=Path)
    set_rounding.add_argument("--weight", type=_rounding_weight, required=True, metavar="{W,nearest}",
                              help="bits per squared bin of error (larger: nearer to nearest rounding)")
    sub.add_parser("eval", help="rate-distortion evaluation (see `aeic eval --help`)", add_help=False)
    return parser


def _missing_extra(command: str, exc: ModuleNotFoundError) -> int:
    """A command run where its extra is not installed (`aeic decode` with the sender extra only: no torch):
    one line naming the extra instead of a traceback. A missing aeic module is a bug and is raised."""
    if not exc.name or exc.name.split(".")[0] == "aeic":
        raise exc
    extra = "receiver" if command in ("decode", "interpolate") else "train"
    print(f"error: `aeic {command}` needs {exc.name.split('.')[0]}, which this install lacks: "
          f"pip install 'aeic[{extra}]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # its own parser: the subparser above only lists it
        try:
            from aeic.evaluation.cli import main_eval

            return main_eval(argv[1:])
        except ModuleNotFoundError as exc:
            return _missing_extra("eval", exc)
    args = build_parser().parse_args(argv)
    handlers = {"encode": cmd_encode, "decode": cmd_decode, "info": cmd_info, "export": cmd_export,
                "relevel": cmd_relevel, "interpolate": cmd_interpolate, "set-rounding": cmd_set_rounding}
    try:
        return handlers[args.command](args)
    except (ModelPackageError, OSError, _Unloadable) as exc:  # a missing or broken model or checkpoint: nothing was done
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        return _missing_extra(args.command, exc)
    except KeyboardInterrupt:  # Ctrl-C in a long SD-Turbo decode was a screen of traceback; what was written stays
        print(f"aeic {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
