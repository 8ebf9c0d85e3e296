"""Peak memory and time of loading each dataset format: the first load (decoding into the
cache) and a later one (memory map), each followed by 200 5-way 1-shot 15-query tasks.

Writes generated files of the sizes below (never real data) and loads each in a fresh
process, sampling /proc/self/status every 2 ms: RssAnon (memory the process owns: what can
only be swapped) and RssFile (pages of mapped files: the decoded cache, reclaimable by the
kernel), each as the peak above the process's level after its imports.

    python scripts/measure_data_memory.py [--scale 1.0] > measurements.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _status() -> tuple[int, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("RssAnon", "RssFile"):
            values[key] = int(rest.split()[0]) * 1024
    return values["RssAnon"], values["RssFile"]


def _measure(name: str, root: str, options: dict[str, object], phase: str) -> dict[str, float]:
    """In this process: load ``name`` (``phase``: "first" decodes, "again" maps the cache)
    and draw tasks."""
    import numpy as np

    from l2l_adversarial.data import FewShotTasks, load_dataset

    base_anon, base_file = _status()
    peaks = {"anon": 0, "file": 0}
    running = True

    def sample() -> None:
        while running:
            anon, file = _status()
            peaks["anon"], peaks["file"] = max(peaks["anon"], anon), max(peaks["file"], file)
            time.sleep(0.002)

    result: dict[str, float] = {}
    if True:
        peaks.update(anon=0, file=0)
        running = True
        thread = threading.Thread(target=sample)
        thread.start()
        start = time.perf_counter()
        try:
            dataset = load_dataset(name, root, "train", **options)  # type: ignore[arg-type]
            loaded = time.perf_counter() - start
            tasks = FewShotTasks(dataset, 5, 1, 15, seed=0)
            for index in range(200):
                tasks[index]
        finally:
            running = False
            thread.join()
        images = np.asarray(dataset.images)  # type: ignore[attr-defined]
        result.update(
            {
                f"{phase}_seconds": loaded,
                f"{phase}_anon_mb": (peaks["anon"] - base_anon) / 1e6,
                f"{phase}_file_mb": (peaks["file"] - base_file) / 1e6,
                "images": len(images),
                "uint8_mb": images.nbytes / 1e6,
            }
        )
        del dataset, tasks, images
    return result


def _write(folder: Path, scale: float) -> list[tuple[str, str, str, dict[str, object]]]:
    import numpy as np
    from data_factories import (
        write_cifar100,
        write_image_folder,
        write_metaoptnet_cifar,
        write_mini_imagenet_formats,
        write_omniglot,
        write_tiered_imagenet,
    )

    per_class = max(16, int(100 * scale))
    mini = write_mini_imagenet_formats(
        folder / "mini", ("train",), num_classes=64, images_per_class=per_class
    )
    runs = [
        (f"mini-imagenet ({fmt})", "mini-imagenet", str(root), {"strict": False, "format": fmt})
        for fmt, root in mini.roots.items()
    ]
    files = write_cifar100(
        folder / "cifar",
        train_per_class=max(16, int(500 * scale)),
        test_per_class=max(1, int(100 * scale)),
    )
    write_metaoptnet_cifar(folder / "cifar-fs", files, "cifar-fs")
    runs += [
        ("cifar-fs (cifar-100-python)", "cifar-fs", str(folder / "cifar"), {"strict": False}),
        ("cifar-fs (metaoptnet)", "cifar-fs", str(folder / "cifar-fs"), {"strict": False}),
    ]
    write_tiered_imagenet(
        folder / "tiered", "train", num_classes=20, images_per_class=max(16, int(300 * scale))
    )
    runs.append(("tiered-imagenet", "tiered-imagenet", str(folder / "tiered"), {"strict": False}))
    write_omniglot(
        folder / "omniglot", alphabets=(30, 20), characters=max(1, int(16 * scale)), drawers=20
    )
    runs.append(("omniglot", "omniglot", str(folder / "omniglot"), {"strict": False}))
    write_image_folder(folder / "folder", classes=50, per_class=max(16, int(100 * scale)), size=128)
    runs.append(("image-folder (128 px -> 84)", "image-folder", str(folder / "folder"), {}))
    del np
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="size of the generated files")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, root, options, phase = args.child
        print(json.dumps(_measure(name, root, json.loads(options), phase)))
        return
    with tempfile.TemporaryDirectory() as temporary:
        runs = _write(Path(temporary), args.scale)
        print(
            "| dataset (format) | images | uint8 MB | first load s | first: anon MB | first: file MB | later load s | later: anon MB | later: file MB |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for title, name, root, options in runs:
            r: dict[str, float] = {}
            for phase in ("first", "again"):
                output = subprocess.run(
                    [sys.executable, __file__, "--child", name, root, json.dumps(options), phase],
                    check=True, capture_output=True, text=True,
                ).stdout  # fmt: skip
                r.update(json.loads(output.splitlines()[-1]))
            print(
                f"| {title} | {r['images']} | {r['uint8_mb']:.0f} | {r['first_seconds']:.1f} | "
                f"{r['first_anon_mb']:.0f} | {r['first_file_mb']:.0f} | {r['again_seconds']:.2f} | "
                f"{r['again_anon_mb']:.0f} | {r['again_file_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
