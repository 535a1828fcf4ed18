"""Benchmark: MG-Geo against img2dataset on the same photos, in one run (so machine noise is shared).

N generated photos (pipeline.io.sample_set, plus its few bad files) are served by a loopback HTTP
server (tests/http_photo_server.py) and compared three ways, each with 2 processes:
  (a) img2dataset alone: URLs -> webdataset, resized to a longer side of 768 (keep_ratio_largest,
      only if bigger, as our image stage), img2dataset's other defaults (EXIF extraction, sha256);
  (b) ours: `mg-geo build --download` (img2dataset keeping the original bytes, then the Meta build
      of the downloaded shards on Beam's FnApiRunner, multi_processing, 2 workers);
  (c) ours: the Meta build from the local files (exif: source) against img2dataset on the same
      files; img2dataset fetches with urllib, which opens file:// URLs, so it reads them from disk.
Every contender runs as its own command in a fresh process (`img2dataset ...`, `mg-geo build ...`),
timed from start to exit, imports included: what a user waits for; --baseline N0 also reports the
throughput at the margin, with each command's fixed start-up cost apart, and the CPU seconds
(user + sys, worker processes included) each photo costs at the margin: their ratio is the
throughput ratio that perfectly busy cores would give, whatever either side's processes do with
their time. This script imports only the standard library at its top (img2dataset's spawned
workers re-import the main script). Throughput is input photos per wall second; ratios are ours /
img2dataset's. --profile runs our build of the local files once more in-process under cProfile
and prints where the time goes.

    python bench/bench_vs_img2dataset.py [--n 2000] [--baseline 200] [--threads 16] [--profile]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from http_photo_server import PhotoServer  # noqa: E402  (standard library only)

# Both sides alike: no update check at import (albumentations, which img2dataset imports), no wandb.
QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
EXPECTED_FILE = "expected.jsonl"  # pipeline.io.sample_set.EXPECTED_FILE (not imported: see above)


def photos_dir(work: Path, n: int, seed: int) -> Path:
    # Same name and seed as bench/bench_build.py: the two benchmarks share the generated photos.
    photos = work / (f"samples-{n}" if seed == 1 else f"samples-{n}-seed{seed}")
    if not (photos / EXPECTED_FILE).exists():
        subprocess.run([sys.executable, "-c", "import sys; from pipeline.io.sample_set import write_samples; "
                        "write_samples(sys.argv[1], int(sys.argv[2]), seed=int(sys.argv[3]))",
                        str(photos), str(n), str(seed)], check=True, cwd=ROOT)
    return photos


def write_tables(photos: Path, base_url: str, out: Path) -> tuple[int, Path, Path]:
    """(photos, parquet of http URLs, parquet of file:// URLs); both sides read the same tables."""
    entries = [json.loads(line) for line in (photos / EXPECTED_FILE).read_text().splitlines()]
    rows = [{"id": e["file"], "url": f"{base_url}/photos/{e['file']}",
             "lat": "" if e["lat"] is None else repr(e["lat"]),
             "lon": "" if e["lon"] is None else repr(e["lon"])} for e in entries]
    files = [{**r, "url": (photos / r["id"]).resolve().as_uri()} for r in rows]
    out.mkdir(parents=True, exist_ok=True)
    http_table, file_table = out / "urls.parquet", out / "files.parquet"
    # pyarrow in a child too: the tables are written once, before any timing starts.
    subprocess.run([sys.executable, "-c", "import json, sys, pyarrow as pa, pyarrow.parquet as pq\n"
                    "for path, rows in json.load(sys.stdin): pq.write_table(pa.Table.from_pylist(rows), path)"],
                   input=json.dumps([[str(http_table), rows], [str(file_table), files]]), text=True, check=True)
    return len(rows), http_table, file_table


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_command(argv: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one command in a fresh process (its output goes to `log`);
    CPU is user + sys of the command and its worker processes (Beam and img2dataset both wait for
    theirs)."""
    env = dict(os.environ, **QUIET_ENV)
    cpu = _children_cpu()
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    cpu = _children_cpu() - cpu
    if done.returncode:
        sys.exit(f"{argv[0]} failed with status {done.returncode}; see {log}")
    return wall, cpu


def img2dataset_alone(table: Path, out: Path, args) -> tuple[float, dict]:
    """img2dataset's own command, as its README runs it."""
    wall, cpu = timed_command([
        str(BIN / "img2dataset"), f"--url_list={table}", "--input_format=parquet", "--url_col=url",
        '--save_additional_columns=["id","lat","lon"]', f"--output_folder={fresh(out)}",
        "--output_format=webdataset", f"--image_size={args.side}", "--resize_mode=keep_ratio_largest",
        "--resize_only_if_bigger=True", f"--processes_count={args.processes}", f"--thread_count={args.threads}",
        f"--number_sample_per_shard={args.samples_per_shard}", f"--timeout={args.timeout}",
        "--enable_wandb=False", "--distributor=multiprocessing"], out.with_suffix(".log"))
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return wall, {"ok": ok, "cpu_s": round(cpu, 2)}


def our_build(sources: list[str], out: Path, args, extra: list[str] = ()) -> tuple[float, dict]:
    """`mg-geo build`, 2 workers on the local runner: (wall time, what its report.json says)."""
    argv = [str(BIN / "mg-geo"), "build", "--out", str(fresh(out)), "--max-side", str(args.side), *extra]
    for source in sources:
        argv += ["--source", source]
    argv += [f"--direct_num_workers={args.processes}", "--direct_running_mode=multi_processing"]
    wall, cpu = timed_command(argv, out.with_suffix(".log"))
    report = json.loads((out / "report.json").read_text())
    return wall, {"samples": report["samples"].get("meta", {}).get("total", 0),
                          "conservation_ok": report["conservation_ok"], "stages": stage_seconds(report),
                          "cpu_s": round(cpu, 2)}


def profile_build(source: str, out: Path, top: int) -> None:
    """Our build in one process (FnApiRunner, in memory) so cProfile sees the stages' own work."""
    import cProfile
    import pstats

    from pipeline.beam.run import BuildConfig, run_build

    profiler = cProfile.Profile()
    profiler.enable()
    run_build(BuildConfig(sources=[source], out=str(fresh(out)), max_side=768), [])
    profiler.disable()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(top)
        lines = text.getvalue().splitlines()
        start = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        print(f"\n--- cProfile, our build of the local files in one process, top {top} by {key} ---")
        print("\n".join(lines[start - 1:]))


def stage_seconds(report: dict) -> str:
    stages = {name: c.get("micros", 0) / 1e6 for name, c in report.get("stages", {}).items() if c.get("micros")}
    return ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))


def run_contenders(photos: Path, vs: Path, args) -> tuple[int, dict, dict]:
    """(photos, {contender: wall seconds}, {contender: details}) of the four commands on `photos`."""
    walls, details = {}, {}
    with PhotoServer(folders={"/photos/": photos}, max_concurrent=256) as server:
        n, http_table, file_table = write_tables(photos, server.base, vs / "tables")
        per_shard = args.samples_per_shard or max(100, min(10_000, -(-n // 8)))  # pipeline.io.download.shard_size
        shard_args = argparse.Namespace(**{**vars(args), "samples_per_shard": per_shard})
        walls["a_img2dataset_http"], details["a_img2dataset_http"] = img2dataset_alone(
            http_table, vs / "a-img2dataset-http", shard_args)
        walls["b_ours_http"], details["b_ours_http"] = our_build([f"table:{http_table}"], vs / "b-build", args, [
            "--download", f"--download-processes={args.processes}", f"--download-threads={args.threads}",
            f"--download-timeout={args.timeout}"])
    walls["c_ours_files"], details["c_ours_files"] = our_build([f"exif:{photos}"], vs / "c-build", args)
    walls["c_img2dataset_files"], details["c_img2dataset_files"] = img2dataset_alone(
        file_table, vs / "c-img2dataset-files", shard_args)
    return n, walls, details


LABELS = {"a_img2dataset_http": "(a) img2dataset, http", "b_ours_http": "(b) ours, http: build --download",
          "c_ours_files": "(c) ours, local files (exif:)", "c_img2dataset_files": "(c) img2dataset, file:// URLs"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2000, help="generated photos (default 2000)")
    parser.add_argument("--baseline", type=int, default=0,
                        help="also run every contender on this many photos first, and report the "
                             "throughput at the margin ((n - baseline) / (wall - baseline wall)) and "
                             "each command's fixed start-up cost apart (default: off)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", default=".bench-out")
    parser.add_argument("--processes", type=int, default=2, help="img2dataset processes, Beam workers (default 2)")
    parser.add_argument("--threads", type=int, default=16, help="img2dataset threads per process (default 16)")
    parser.add_argument("--samples-per-shard", type=int, default=None,
                        help="img2dataset's shard size (default: the photos in 8 shards, as `mg-geo build "
                             "--download` cuts them; img2dataset spreads shards over its processes, and "
                             "starts a new process every 5 shards)")
    parser.add_argument("--side", type=int, default=768)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--profile", action="store_true", help="also cProfile our local-files build")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    work = Path(args.work).resolve()
    vs = work / "vs-img2dataset"
    print(f"{args.processes} processes, {args.threads} threads each, {os.cpu_count()} CPUs; "
          f"each command in a fresh process", flush=True)
    base = None
    if args.baseline:
        n0, walls0, details0 = run_contenders(photos_dir(work, args.baseline, args.seed), vs / "baseline", args)
        base = (n0, walls0)
        print(f"baseline, {n0} photos: " + ", ".join(f"{k} {v:.1f}s" for k, v in walls0.items()), flush=True)
    n, walls, details = run_contenders(photos_dir(work, args.n, args.seed), vs, args)
    results = {}
    print(f"\n{n} photos ({args.n} good + bad ones)")
    for key, wall in walls.items():
        results[key] = {"wall_s": round(wall, 2), "img_per_s": round(n / wall, 2), **details[key]}
        line = f"{LABELS[key] + ':':<36}{wall:7.1f}s  {n / wall:7.1f} img/s"
        if base:
            n0, walls0 = base
            margin = (n - n0) / max(1e-9, wall - walls0[key])  # photos per second at the margin
            fixed = wall - n / margin                           # the wall time no photo accounts for
            cpu_ms = 1000 * (details[key]["cpu_s"] - details0[key]["cpu_s"]) / (n - n0)
            results[key].update(margin_img_per_s=round(margin, 2), fixed_s=round(fixed, 2),
                                margin_cpu_ms_per_img=round(cpu_ms, 3))
            line += (f"   at the margin {margin:7.1f} img/s, fixed start-up {fixed:5.1f}s, "
                     f"CPU {cpu_ms:.2f} ms/img")
        print(line + (f"   stages: {details[key]['stages']}" if "stages" in details[key] else ""), flush=True)
    ratios = {"http": results["b_ours_http"]["img_per_s"] / results["a_img2dataset_http"]["img_per_s"],
              "files": results["c_ours_files"]["img_per_s"] / results["c_img2dataset_files"]["img_per_s"]}
    print(f"\nratio ours/img2dataset, whole commands: http (b)/(a) {ratios['http']:.2f}x (goal >= 1.0x), "
          f"files (c) {ratios['files']:.2f}x (goal >= 1.5x)")
    if base:
        ratios["http_margin"] = results["b_ours_http"]["margin_img_per_s"] / results["a_img2dataset_http"]["margin_img_per_s"]
        ratios["files_margin"] = (results["c_ours_files"]["margin_img_per_s"]
                                  / results["c_img2dataset_files"]["margin_img_per_s"])
        print(f"ratio ours/img2dataset, fixed start-up apart: http {ratios['http_margin']:.2f}x, "
              f"files {ratios['files_margin']:.2f}x")
        # CPU per photo at the margin: the throughput ratio that perfectly busy cores would give,
        # whatever the runner or img2dataset's processes do with their time.
        cpu = {k: results[k]["margin_cpu_ms_per_img"] for k in results}
        ratios["http_cpu"] = cpu["a_img2dataset_http"] / cpu["b_ours_http"]
        ratios["files_cpu"] = cpu["c_img2dataset_files"] / cpu["c_ours_files"]
        print(f"ratio img2dataset's / our CPU per photo at the margin: http {ratios['http_cpu']:.2f}x, "
              f"files {ratios['files_cpu']:.2f}x")
    print(json.dumps({"n": n, "baseline": args.baseline, "processes": args.processes, "threads": args.threads,
                      "cpus": os.cpu_count(), "ratios": {k: round(v, 3) for k, v in ratios.items()},
                      "results": results}))
    if args.profile:
        profile_build(f"exif:{photos_dir(work, args.n, args.seed)}", vs / "profile-build", args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
