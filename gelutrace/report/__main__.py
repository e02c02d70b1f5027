"""`python -m gelutrace.report DATASET_DIR`: the run's report.md (gelutrace.report.report), and its summary."""

from pathlib import Path

from gelutrace import PipelineError
from gelutrace.cli import parser, run_main
from gelutrace.report import report


def main(argv=None):
    ap = parser(report.__doc__)
    ap.add_argument("dataset_dir", help="the run's dataset directory")
    for flag in ("model_type", "input_csv", "input_text", "eval_csv", "eval_text", "eval_tokens", "thresholds", "weights",
                 "ks", "ratios", "methods", "random_controls", "control_subsets", "modules_top", "module_controls",
                 "temperature", "seed", "effect_tokens", "exclude_layers",
                 "device"):
        ap.add_argument(f"--{flag}", help="recorded in the report's parameter table")
    args = ap.parse_args(argv)
    data = Path(args.dataset_dir)
    if not data.is_dir():
        why = "is not a directory" if data.exists() else "does not exist"
        raise PipelineError(f"dataset directory {data} {why}")
    params = {k: v for k, v in vars(args).items() if v not in (None, "")}
    print(report.write_report(data, params))


if __name__ == "__main__":
    run_main(main)
