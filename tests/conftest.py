import os

import pytest

# Triton kernels run through the interpreter on CPU (CI has no GPU); must be set before triton imports.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The two xdist workers share CI's two cores: one intra-op thread each (daemons they start included), or
# their thread pools contend (tests/engine's kv_compression and quality modules: 5m38s -> 4m59s).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def _shared_fixture_group(item: pytest.Item) -> str | None:
    """The group of tests that must share a worker for a module- or package-scoped fixture of theirs
    (a daemon, an engine) to be built once: the package for a package-scoped one, else the module.
    None for a test with function- and session-scoped fixtures only: it may run anywhere."""
    scopes = {defs[-1].scope: defs[-1].baseid for defs in item._fixtureinfo.name2fixturedefs.values()}
    if "package" in scopes:
        return scopes["package"]
    if "module" in scopes or "class" in scopes:
        return item.nodeid.split("::")[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks (--dist loadgroup)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if group := _shared_fixture_group(item):
            item.add_marker(pytest.mark.xdist_group(group))
