"""Support staff keep the gift catalog."""


def test_a_gift_added_to_the_catalog_is_listed_with_its_stock(credex):
    added = credex(
        "catalog",
        "add",
        "SHAMPOO-500",
        "--name",
        "Shampoo 500 ml",
        "--points",
        "20000",
        "--stock",
        "5",
        "--json",
    )
    assert added.exit_code == 0, added.stderr
    assert added.json() == {
        "sku": "SHAMPOO-500",
        "name": "Shampoo 500 ml",
        "points": 20000,
        "stock": 5,
        "active": True,
    }

    listed = credex("catalog", "list", "--json")
    assert listed.json() == [added.json()]


def test_a_gift_without_stock_is_unlimited(credex):
    added = credex("catalog", "add", "EBOOK", "--name", "An e-book", "--points", "300", "--json")
    assert added.json()["stock"] is None


def test_adding_the_same_sku_twice_is_a_conflict_and_keeps_the_first(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "500")
    again = credex("catalog", "add", "MUG", "--name", "Other mug", "--points", "1", "--json")
    assert again.exit_code == 1
    assert '"conflict"' in again.stderr
    assert credex("catalog", "list", "--json").json()[0]["name"] == "Mug"


def test_updating_a_gift_changes_only_what_was_given(credex):
    credex("catalog", "add", "MUG", "--name", "Mug", "--points", "500", "--stock", "3")
    updated = credex("catalog", "update", "MUG", "--points", "450", "--inactive", "--json")
    assert updated.exit_code == 0, updated.stderr
    assert updated.json() == {"sku": "MUG", "name": "Mug", "points": 450, "stock": 3, "active": False}
    unlimited = credex("catalog", "update", "MUG", "--stock", "unlimited", "--active", "--json")
    assert unlimited.json()["stock"] is None and unlimited.json()["active"] is True


def test_updating_an_unknown_gift_is_refused(credex):
    result = credex("catalog", "update", "NOPE", "--points", "1")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: no gift with sku NOPE in the catalog"


def test_bad_catalog_input_is_refused_and_changes_nothing(credex):
    for args in (
        ["--points", "0"],
        ["--points", "-5"],
        ["--points", "ten"],
        ["--points", "99999999999999999999"],
        ["--points", "10", "--stock", "-1"],
    ):
        result = credex("catalog", "add", "BAD", "--name", "Bad", *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert credex("catalog", "list", "--json").json() == []
