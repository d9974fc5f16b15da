"""Unit-test collection: a module that reruns another module's tests on a second
implementation (tests/unit/test_fastpath_*.py) names, in ``not_applicable(item)``,
the combinations that cannot apply there; those are deselected at collection
rather than reported as skips."""


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        rule = getattr(getattr(item, "module", None), "not_applicable", None)
        (drop if rule is not None and rule(item) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
