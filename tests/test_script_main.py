"""A stage script's main(argv) called in this process, as the tests call it: it leaves the process's autograd mode
and thread count as they were, and a bad flag or input is one 'error:' line and exit status 2."""

import pytest
import torch

import a_generate_gelu_graph
import b_trace_gelu_activations
from conftest import SHIPPED_NAME
from gelutrace.cli import run_main


@pytest.mark.parametrize("grad", [True, False])
def test_main_leaves_grad_mode_and_threads(shipped_path, tmp_path, grad, capsys, monkeypatch):
    """The work runs without autograd, and the caller's autograd mode and thread count are as they were after."""
    seen = []
    real = b_trace_gelu_activations.trace

    def trace(*a, **k):
        seen.append(torch.is_grad_enabled())
        return real(*a, **k)

    monkeypatch.setattr(b_trace_gelu_activations, "trace", trace)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with torch.set_grad_enabled(grad):
            status = run_main(b_trace_gelu_activations.main,
                              ["--model_type", SHIPPED_NAME, "--device", "cpu", "--input_text", "KING. ",
                               "--output_dir", str(tmp_path)], exit=False)
            assert status == 0, capsys.readouterr().err
            assert torch.is_grad_enabled() is grad
            assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    assert seen == [False]
    assert (tmp_path / f"{SHIPPED_NAME}_active_neurons.txt").is_file()


@pytest.mark.parametrize("main,argv", [
    (a_generate_gelu_graph.main, ["--no_such_flag"]),
    (b_trace_gelu_activations.main, ["--model_type", SHIPPED_NAME, "--input_text", " "]),
])
def test_a_bad_flag_or_input_is_one_error_line_and_status_2(main, argv, capsys):
    grad = torch.is_grad_enabled()
    assert run_main(main, argv, exit=False) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert torch.is_grad_enabled() is grad


def test_help_names_the_script_and_returns_0(capsys):
    assert run_main(a_generate_gelu_graph.main, ["--help"], exit=False) == 0
    assert capsys.readouterr().out.startswith("usage: a_generate_gelu_graph.py ")
