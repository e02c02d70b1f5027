"""
`gelutrace STAGE [flags]`: the stage scripts as one installed command. `gelutrace b --input_csv ...` runs
b_generate_activation_dataset.py with those flags, exactly as `python b_generate_activation_dataset.py ...` in a
checkout does; `gelutrace run ...` is run_pipeline.sh (gelutrace.pipeline); `gelutrace serve DIR` serves a folder
(the viewer pages and graph files of many prompts) on 127.0.0.1; `gelutrace --help` lists the stages.
"""

import argparse
import functools
import http.server
import runpy
import sys
from pathlib import Path

STAGES = {
    "a": "a_generate_gelu_graph",
    "b": "b_generate_activation_dataset",
    "b-trace": "b_trace_gelu_activations",
    "c": "c_calculate_weighted_activation_graph",
    "c-analyze": "c_analyze_weighted_activation_graph",
    "c-merge": "c_merge_activation_statistics",
    "c-fidelity": "c_measure_edge_fidelity",
    "c-modules": "c_find_modules",
    "d": "d_calculate_perturbation_subset",
    "d-effects": "d_calculate_neuron_effects",
    "e": "e_generate_perturbed_results",
    "f": "f_render_neuron_cards",
    "report": "gelutrace.report",
    "run": "gelutrace.pipeline",  # the whole pipeline: its `run` command
}


def usage() -> str:
    lines = ["usage: gelutrace STAGE [flags]   (gelutrace STAGE --help: the stage's flags)", "", "stages:"]
    lines += [f"  {k:<11} {v}{'' if '.' in v else '.py'}" for k, v in STAGES.items()]
    lines += ["", "  serve DIR   serve DIR on http://127.0.0.1 (gelutrace serve --help)"]
    return "\n".join(lines)


class _LocalFiles(http.server.SimpleHTTPRequestHandler):
    """The folder's own files, to this machine's own pages: a request naming another host (a page of another site
    whose name was made to point here) is refused, and so is a path that resolves outside the folder (through a
    symbolic link) or into a hidden file or folder (locks, staging)."""

    def send_head(self):
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost"):
            self.send_error(403, "only requests to 127.0.0.1 or localhost are served")
            return None
        root = Path(self.directory).resolve()
        target = Path(self.translate_path(self.path)).resolve()
        inside = target == root or root in target.parents
        if not inside or any(part.startswith(".") for part in target.relative_to(root).parts):
            self.send_error(404, "not found")
            return None
        return super().send_head()


def serve(argv) -> int:
    """`gelutrace serve DIR [--port N]`: DIR's files over HTTP on 127.0.0.1 alone, until interrupted."""
    ap = argparse.ArgumentParser(prog="gelutrace serve", description="Serve a folder (the viewer pages "
                                 "{m}_trace_graph.html, {m}_causal_graph.html and the graph files of many prompts) "
                                 "on 127.0.0.1, for browsing; the pages themselves need no server.")
    ap.add_argument("directory", help="the folder to serve")
    ap.add_argument("--port", type=int, default=8000, help="the port (0: any free one; default: %(default)s)")
    args = ap.parse_args(argv)
    directory = Path(args.directory)
    if not directory.is_dir():
        print(f"error: {directory} is not a directory", file=sys.stderr)
        return 2
    handler = functools.partial(_LocalFiles, directory=str(directory))
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    except (OSError, OverflowError) as e:
        print(f"error: cannot serve on 127.0.0.1 port {args.port}: {e}", file=sys.stderr)
        return 2
    with server:
        print(f"serving {directory} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(f"{usage()}\n\nerror: name a stage", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] == "serve":
        return serve(argv[1:])
    by_script = {v.split(".")[-1]: v for v in STAGES.values()} | {v + ".py": v for v in STAGES.values()}
    module = STAGES.get(argv[0]) or by_script.get(argv[0])
    if module is None:
        print(f"{usage()}\n\nerror: unknown stage {argv[0]!r}", file=sys.stderr)
        return 2
    if module == "gelutrace.pipeline":
        from gelutrace import pipeline  # lazy: `gelutrace --help` and the stages do without the driver
        from gelutrace.cli import run_main  # lazy: as above

        run_main(lambda: pipeline.main(["run", *argv[1:]]))
        return 0
    sys.argv = [f"gelutrace {argv[0]}", *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
