"""Write the WMCA layout that :class:`anomaly_lab.data.wmca.WMCADataModule` reads from Idiap's HDF5 files.

    python -m anomaly_lab.data.wmca_extract <hdf5 dir> <out dir> [--protocol FILE] [--every N]
        [--channels 0,1,2] [--boxes FILE] [--dataset KEY]

Input: one HDF5 file per video under <hdf5 dir>, and a protocol CSV (default <hdf5 dir>/protocol.csv)
with the header `file,split,attack_type`: the file's path relative to <hdf5 dir>, its split (train,
dev, test) and its attack type (bonafide, pp, sr, pm, fm or another WMCA type), e.g. compiled from
the protocol lists published with WMCA.

Frames are read as WMCA stores them: one group per frame at the top level (`Frame_<n>`, in the order
of n) holding a dataset `array`, [C, H, W] (channels first, as Bob writes them) or [H, W]; or, with
`--dataset KEY`, one stacked dataset [N, C, H, W] or [N, H, W]. `--channels` picks the planes of the
written image: 0,1,2 (default) is the colour stream's RGB; a single plane (e.g. 0, the grayscale of
the preprocessed four-plane files) writes a grayscale PNG. Frames that are not uint8 are scaled by
their own minimum and maximum. `--every N` keeps frames 0, N, 2N, ... `--boxes FILE` (header
`file,frame,left,top,width,height`, frame = index in the video) crops the listed frames to their face
box; frames without a box are written whole.

Output: <out dir>/frames/<video_id>/<frame index, 3 digits>.png and <out dir>/protocol.csv
(`video_id,split,attack_type`), video_id = the HDF5 file name without its extension.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import cv2
import numpy as np

from anomaly_lab.data.dataset import crop
from anomaly_lab.errors import AnomalyLabError, DataError


def frame_to_image(array: np.ndarray, channels: list[int]) -> np.ndarray:
    """One frame ([C, H, W] channels first, or [H, W]) -> RGB or grayscale uint8 [H, W(, 3)]."""
    planes = array[None] if array.ndim == 2 else array
    if planes.ndim != 3 or max(channels) >= planes.shape[0]:
        raise DataError(f"a frame of shape {array.shape} has no channel(s) {channels} (expected [C, H, W] or [H, W])")
    image = planes[channels].transpose(1, 2, 0)
    if image.dtype != np.uint8:
        low, high = float(image.min()), float(image.max())
        image = np.round((image - low) / max(high - low, 1e-12) * 255).astype(np.uint8)
    return image[..., 0] if image.shape[2] == 1 else image


def read_frames(path: Path, dataset: str | None = None) -> list[np.ndarray]:
    """Every frame of one WMCA HDF5 file, in order."""
    try:
        import h5py
    except ImportError:
        raise DataError("reading WMCA's HDF5 files needs h5py: pip install h5py") from None
    try:
        with h5py.File(path, "r") as file:
            if dataset is not None:
                return list(file[dataset][()])
            keys = [k for k in file if isinstance(file[k], h5py.Group) and "array" in file[k]]
            keys.sort(key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
            return [file[k]["array"][()] for k in keys]
    except (OSError, KeyError) as error:
        raise DataError(f"cannot read WMCA video {path}: {error}") from error


def read_csv(path: Path, columns: set[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise DataError(f"{path} not found (expected a CSV with the header {','.join(sorted(columns))})")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        if reader.fieldnames is None or not columns <= set(reader.fieldnames):
            raise DataError(f"{path} must have the columns {sorted(columns)}, found {reader.fieldnames}")
        return list(reader)


def read_boxes(path: Path | None) -> dict[tuple[str, int], tuple[int, int, int, int]]:
    if path is None:
        return {}
    rows = read_csv(path, {"file", "frame", "left", "top", "width", "height"})
    return {
        (Path(r["file"]).as_posix(), int(r["frame"])): tuple(round(float(r[k])) for k in ("left", "top", "width", "height"))
        for r in rows
    }


def extract(
    hdf5_dir: Path,
    out_dir: Path,
    protocol: Path | None = None,
    every: int = 1,
    channels: tuple[int, ...] = (0, 1, 2),
    boxes: Path | None = None,
    dataset: str | None = None,
) -> int:
    """Write the frames and protocol.csv of every video listed in the protocol; return the frame count."""
    if every < 1 or len(channels) not in (1, 3):
        raise DataError(f"--every must be >= 1 and --channels one or three planes, got {every} and {list(channels)}")
    rows = read_csv(protocol or hdf5_dir / "protocol.csv", {"file", "split", "attack_type"})
    face_boxes = read_boxes(boxes)
    video_ids = [Path(r["file"]).stem for r in rows]
    duplicates = sorted({v for v in video_ids if video_ids.count(v) > 1})
    if duplicates:
        raise DataError(f"video ids (HDF5 file names without extension) must be unique, repeated: {duplicates}")
    written = 0
    for row, video_id in zip(rows, video_ids, strict=True):
        folder = out_dir / "frames" / video_id
        folder.mkdir(parents=True, exist_ok=True)
        for index, frame in enumerate(read_frames(hdf5_dir / row["file"], dataset)):
            if index % every:
                continue
            image = frame_to_image(np.asarray(frame), list(channels))
            box = face_boxes.get((Path(row["file"]).as_posix(), index))
            image = crop(image, box) if box is not None else image
            pixels = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(folder / f"{index:03d}.png"), pixels):
                raise DataError(f"cannot write {folder / f'{index:03d}.png'}")
            written += 1
    with open(out_dir / "protocol.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["video_id", "split", "attack_type"])
        writer.writerows([v, r["split"], r["attack_type"]] for v, r in zip(video_ids, rows, strict=True))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hdf5_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--protocol", type=Path, default=None, help="CSV file,split,attack_type (default <hdf5 dir>/protocol.csv)")
    parser.add_argument("--every", type=int, default=1, help="keep every n-th frame")
    parser.add_argument("--channels", default="0,1,2", help="planes of the written image: 0,1,2 (RGB) or one plane")
    parser.add_argument("--boxes", type=Path, default=None, help="CSV file,frame,left,top,width,height of face boxes")
    parser.add_argument("--dataset", default=None, help="a stacked [N, C, H, W] dataset instead of Frame_<n>/array groups")
    args = parser.parse_args(argv)
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
        count = extract(args.hdf5_dir, args.out_dir, args.protocol, args.every, channels, args.boxes, args.dataset)
    except (AnomalyLabError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {count} frames and {args.out_dir / 'protocol.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
