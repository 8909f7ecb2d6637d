import pytest

from lowbit._registry import Registry, UnknownNameError


def test_register_get_list_and_unknown_name_lists_valid_ones() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("alpha")(1)
    reg.register("beta_two")(2)
    assert reg.get("beta_two") == 2
    assert reg.get(7) == 7  # a non-string passes through: objects are accepted where names are
    assert reg.list("b*") == ["beta_two"]
    assert "alpha" in reg and len(reg) == 2
    with pytest.raises(UnknownNameError) as e:
        reg.get("gamma")
    assert "unknown widget 'gamma'" in str(e.value) and "alpha, beta_two" in str(e.value)


def test_duplicate_registration_is_an_error() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a")(2)
