"""comic_pipeline.comic_names: the one naming rule (name -> partition key)."""

import unicodedata

import pytest

from comic_pipeline.comic_names import ComicNameError, comic_key, is_comic_key, keys_by_name

# Pinned: the key of a name must never change across machines or releases (partitions, output
# groups and the splits' comic ids are keyed by it). Changing the scheme breaks these on purpose.
PINNED = {
    "demo-0001": "demo-0001",
    "Amazing Spider-Man (1963) #001": "amazing-spider-man-1963-001~ddc539ffcd880096",
    "Tintin - L'Île noire": "tintin-l-ile-noire~e30df2eb685168e2",
    "Action Comics 0001, 1938": "action-comics-0001-1938~4b6a6ca7a1745da5",
    "series/Book 000 - Issue #1": "series-book-000-issue-1~e647a0007ce0d124",
    "Foo": "foo~1cbec737f863e492",
    "foo": "foo",
}

NAMES = [
    "Amazing Spider-Man (1963) #001", "amazing spider-man (1963) #001", "AMAZING SPIDER-MAN (1963) #001",
    "Amazing Spider-Man (1963) #1", "Amazing Spider-Man 1963 001", "Tintin - L'Île noire",
    "Tintin - L'Ile noire", "Calvin & Hobbes", "Calvin and Hobbes", "Astérix, le Gaulois",
    "東京喰種 第1巻", "東京喰種 第2巻", "series/Book 000 - Issue #1", "series/Book 000 - Issue #2",
    "a b", "A B", "a-b", "a_b", "a.b", "a...b", "..", "_x", "-x", ".hidden", "x" * 230, "x" * 231,
    "é" * 150, unicodedata.normalize("NFD", "Île"), unicodedata.normalize("NFC", "Île"),
    "tab\there", "line\nbreak", "demo-0001", "Demo-0001",
]


@pytest.mark.parametrize("name, key", sorted(PINNED.items()))
def test_keys_are_pinned(name, key):
    assert comic_key(name) == key


def test_keys_are_unique_even_ignoring_case():
    keys = [comic_key(name) for name in NAMES]
    assert len(set(keys)) == len(NAMES)
    assert len({key.casefold() for key in keys}) == len(NAMES)  # case-insensitive filesystems, S3 UIs
    assert keys == [key.lower() for key in keys]


def test_keys_are_valid_dagster_partition_keys_and_single_path_components():
    import dagster as dg

    keys = [comic_key(name) for name in NAMES]
    for key in keys:
        assert is_comic_key(key)
        assert "..." not in key and ".." not in key and "/" not in key and "\\" not in key
        assert key.isascii() and key.isprintable() and len(key) <= 100 and not key.startswith(".")
    partitions = dg.DynamicPartitionsDefinition(name="comics")
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("comics", keys)  # dagster validates the keys here
    assert sorted(partitions.get_partition_keys(dynamic_partitions_store=instance)) == sorted(keys)


def test_readable_where_the_name_is():
    assert comic_key("demo-0001") == "demo-0001"
    assert comic_key("Amazing Spider-Man (1963) #001").startswith("amazing-spider-man-1963-001~")
    assert comic_key("東京喰種").startswith("comic~")  # nothing readable in ASCII: the hash alone
    assert comic_key("東京喰種 第1巻").startswith("1~")  # what ASCII there is
    assert len(comic_key("x" * 230)) == 48 + 1 + 16


@pytest.mark.parametrize("bad", ["", "   ", None, 3, "\ud800"])
def test_not_a_name(bad):
    with pytest.raises(ComicNameError):
        comic_key(bad)


def test_keys_by_name_reports_shared_keys():
    unique, shared = keys_by_name(["a", "B"])
    assert unique == {"a": "a", comic_key("B"): "B"} and shared == {}
