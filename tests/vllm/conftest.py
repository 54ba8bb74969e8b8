"""The agreements the vLLM tests measured, in the run's summary (CI shows no test's output)."""
from tests.vllm.helpers import FIGURES


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("vLLM vs HF greedy agreement (measured)")
        for line in FIGURES:
            terminalreporter.write_line(line)
