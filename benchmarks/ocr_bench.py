"""OCR quality and speed on FUNSD's 50 scanned test forms: character error rate (CER) against the
annotated words, and pages/s, for our ``TesseractOCR`` (the class the ingest pipeline and /v1/ocr use)
in its page segmentation modes, against the bare ``tesseract`` command line as the speed baseline.

CER is aligned by position, so Tesseract's reading order (which differs from the annotators' on
forms) does not count as an error: every OCR word is assigned to the annotated entity its box
overlaps most; per entity, the words it received (in reading order) are compared with the entity's
annotated words by Levenshtein distance. CER = total edits / total annotated characters; an entity
nothing was assigned to costs all its characters. Words over no entity (stamps, noise) are counted
apart. Word accuracy is the share of annotated words found verbatim in their entity's OCR text.

The data is read in place from ../shared/data/funsd-testing (licence: research and evaluation only;
never copied into the repo).

    python benchmarks/ocr_bench.py
    python benchmarks/ocr_bench.py --limit 10 --modes 3
    python benchmarks/ocr_bench.py --smoke             # 2 forms, one mode: seconds (tests)

Writes benchmarks/results/ocr_bench.json and ocr_bench.png.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import machine, write_results  # noqa: E402


def load_funsd(folder: Path, limit: int | None) -> list[tuple[Path, list[dict]]]:
    pages = []
    for image in sorted((folder / "images").glob("*.png"))[:limit]:
        form = json.loads((folder / "annotations" / f"{image.stem}.json").read_text())["form"]
        entities = []
        for entity in form:
            words = [w for w in entity["words"] if w["text"].strip()]
            if words:
                entities.append({"box": entity["box"], "words": [w["text"].strip() for w in words]})
        pages.append((image, entities))
    return pages


def overlap(a, b) -> float:
    """Intersection area over the area of ``a`` (an OCR word box)."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    area = max((a[2] - a[0]) * (a[3] - a[1]), 1)
    return max(w, 0) * max(h, 0) / area


def score_page(ocr_words: list, entities: list[dict]) -> dict:
    from rapidfuzz.distance import Levenshtein

    assigned: list[list[str]] = [[] for _ in entities]
    stray = 0
    for word in ocr_words:  # in Tesseract's reading order
        best, best_overlap = None, 0.0
        for i, entity in enumerate(entities):
            o = overlap(word.box, entity["box"])
            if o > best_overlap:
                best, best_overlap = i, o
        if best is None or best_overlap < 0.3:
            stray += 1
        else:
            assigned[best].append(word.text)
    edits = chars = words = found = 0
    for entity, got in zip(entities, assigned):
        truth = " ".join(entity["words"])
        edits += Levenshtein.distance(truth, " ".join(got))
        chars += len(truth)
        words += len(entity["words"])
        found += sum(1 for w in entity["words"] if w in got)
    return {"edits": edits, "chars": chars, "words": words, "found": found, "stray": stray}


def run_ours(pages, psm: int, workers: int) -> dict:
    from PIL import Image

    from ray_app.documents.config import OCRConfig
    from ray_app.documents.ocr import TesseractOCR

    ocr = TesseractOCR(OCRConfig(psm=psm, threads=1))

    def one(page):
        image, entities = page
        result = ocr.image(Image.open(image))
        return score_page([w for line in result.lines for w in line.words], entities)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:  # tesseract runs in subprocesses: threads are enough
        scores = list(pool.map(one, pages))
    seconds = time.perf_counter() - started
    total = {k: sum(s[k] for s in scores) for k in scores[0]}
    per_page = sorted(s["edits"] / s["chars"] for s in scores)
    return {"name": f"ours psm {psm}", "psm": psm, "workers": workers, "pages": len(pages),
            "seconds": round(seconds, 2), "pages_per_s": round(len(pages) / seconds, 3),
            "cer": round(total["edits"] / total["chars"], 4),
            "cer_median_page": round(per_page[len(per_page) // 2], 4),
            "word_accuracy": round(total["found"] / total["words"], 4),
            "stray_words": total["stray"], "annotated_chars": total["chars"], "annotated_words": total["words"]}


def run_raw_cli(pages, psm: int, workers: int) -> dict:
    """The bare command line on the file (plain text out): what an OCR call costs without our wrapper."""
    binary = shutil.which("tesseract")
    env = {"OMP_THREAD_LIMIT": "1", "PATH": "/usr/bin:/bin"}

    def one(page):
        subprocess.run([binary, str(page[0]), "stdout", "--psm", str(psm)], capture_output=True, check=True, env=env)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, pages))
    seconds = time.perf_counter() - started
    return {"name": f"tesseract CLI psm {psm}", "psm": psm, "workers": workers, "pages": len(pages),
            "seconds": round(seconds, 2), "pages_per_s": round(len(pages) / seconds, 3)}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["name"] + f"\n{r['workers']} worker(s)" for r in runs]
    bars = axes[0].barh(names, [r["pages_per_s"] for r in runs], color="#66c2a5")
    axes[0].bar_label(bars, fmt="%.2f")
    axes[0].set_xlabel("pages/s (FUNSD forms, ~754x1000 px)")
    scored = [r for r in runs if "cer" in r]
    bars = axes[1].barh([r["name"] for r in scored], [r["cer"] for r in scored], color="#fc8d62")
    axes[1].bar_label(bars, fmt="%.3f")
    axes[1].set_xlabel("character error rate (lower is better)")
    fig.suptitle(f"OCR on FUNSD test ({runs[0]['pages']} scanned forms), Tesseract {report['tesseract']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="2 forms, psm 3, 2 workers: seconds (tests)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "funsd-testing"))
    parser.add_argument("--limit", type=int, default=None, help="only the first N forms")
    parser.add_argument("--modes", type=int, nargs="+", default=[3, 11], help="page segmentation modes to score")
    parser.add_argument("--workers", type=int, default=2, help="pages OCR'd at once in the parallel run")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit, args.modes = args.limit or 2, [3]

    pages = load_funsd(Path(args.data), args.limit)
    version = subprocess.run(["tesseract", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    runs = [run_raw_cli(pages, 3, 1)]
    for psm in args.modes:
        runs.append(run_ours(pages, psm, 1))
        print(json.dumps(runs[-1]), file=sys.stderr)
    if args.workers > 1:
        runs.append(run_ours(pages, args.modes[0], args.workers))
    default = next(r for r in runs if r.get("psm") == 3 and r["workers"] == 1 and "cer" in r)
    report = {"benchmark": "ocr_bench", "dataset": f"FUNSD test ({len(pages)} scanned forms)", "smoke": args.smoke,
              "tesseract": version.strip(), "runs": runs,
              "ours_vs_cli_speed": round(default["pages_per_s"] / runs[0]["pages_per_s"], 3), "machine": machine()}
    write_results("ocr_bench" + ("_smoke" if args.smoke else ""), report, Path(args.out), plot)
    print(f"{'run':28} {'workers':>7} {'pages/s':>8} {'CER':>7} {'word acc':>8}")
    for r in runs:
        print(f"{r['name']:28} {r['workers']:7d} {r['pages_per_s']:8.3f} {r.get('cer', float('nan')):7.4f} "
              f"{r.get('word_accuracy', float('nan')):8.4f}")
    print(f"our wrapper vs bare tesseract CLI (1 worker, psm 3): {report['ours_vs_cli_speed']}x the pages/s")
    return report


if __name__ == "__main__":
    main()
