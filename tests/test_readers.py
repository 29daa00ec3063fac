"""RecBole/UniSRec atomic files and raw MovieLens-100K, on small fixtures written here."""

from pathlib import Path

import numpy as np
import pytest

from karma.data import DataError, leave_one_out, load_source, read_movielens, read_recbole
from karma.data.readers import split_recbole_text

INTER_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def write(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------- RecBole: hand-written files

def write_tiny_recbole(d: Path) -> None:
    write(d / "Sci.text", "item_id:token\ttext:token_seq\n"
          "B01\tGorilla Glue, 8 oz. Industrial & Scientific Adhesives. Gorilla. \n"
          "B00\tLab Beaker 250 ml. Industrial & Scientific Lab Glassware. Pyrex. \n"
          "B02\tFan 24 in. Diameter. . TPI. \n"  # '. ' in the title, empty categories
          "B03\tMystery Part\n"
          "B99\tNot indexed. Nothing. Nobody. \n")
    write(d / "Sci.item2index", "B00\t0\nB01\t1\nB02\t2\nB03\t3\n")
    write(d / "Sci.user2index", "AX\t0\nAY\t1\n")
    # user 0: 0 1 2 3 1 ; user 1: 3 2 0
    write(d / "Sci.train.inter", INTER_HEADER + "0\t0 1\t2\n0\t0\t1\n")
    write(d / "Sci.valid.inter", INTER_HEADER + "0\t0 1 2\t3\n1\t3\t2\n")
    write(d / "Sci.test.inter", INTER_HEADER + "0\t0 1 2 3\t1\n1\t3 2\t0\n")


def test_read_recbole_hand_written(tmp_path):
    write_tiny_recbole(tmp_path)
    d = read_recbole(tmp_path, name="Sci")
    assert d.name == "Sci" and d.n_items == 4 and d.n_users == 2
    it = d.items
    assert it.item_id.tolist() == [0, 1, 2, 3]
    assert it.asin.tolist() == ["B00", "B01", "B02", "B03"]
    assert it.title.tolist() == ["Lab Beaker 250 ml", "Gorilla Glue, 8 oz", "Fan 24 in. Diameter", "Mystery Part"]
    assert it.category.tolist() == ["Industrial & Scientific Lab Glassware",
                                    "Industrial & Scientific Adhesives", "", ""]
    assert it.brand.tolist() == ["Pyrex", "Gorilla", "TPI", ""]
    assert it.text.tolist() == ["", "", "", ""]
    ev = d.events
    assert ev.user_id.tolist() == [0] * 5 + [1] * 3
    assert ev.item_id.tolist() == [0, 1, 2, 3, 1, 3, 2, 0]
    assert ev.ts.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert d.users.reviewer_id.tolist() == ["AX", "AY"]


@pytest.mark.parametrize("text, parts", [
    ("Title. Cat A Cat B. Brand. ", ("Title", "Cat A Cat B", "Brand")),
    ("A. B. Title. Cat. Brand. ", ("A. B. Title", "Cat", "Brand")),  # '. ' inside titles kept
    ("Title. . Brand. ", ("Title", "", "Brand")),                    # empty categories
    ("Title. Cat. . ", ("Title", "Cat", "")),                        # empty brand
    ("Title. . . ", ("Title", "", "")),
    ("Only a title", ("Only a title", "", "")),                      # fewer parts
    ("Title. Brand", ("Title", "Brand", "")),
])
def test_split_recbole_text(text, parts):
    assert split_recbole_text(text) == parts


# ---------------------------------------------------------------- RecBole: generated like the preprocessing

def write_recbole(d: Path, seqs: dict[int, list[int]], n_items: int, L: int, name: str = "Sci",
                  drop_test: tuple[int, ...] = ()) -> None:
    """Writes what UniSRec's preprocessing writes: every training prefix (newest first),
    then the valid and test rows, histories cut to the last L items."""
    write(d / f"{name}.text", "item_id:token\ttext:token_seq\n" +
          "".join(f"A{i:03d}\tItem {i}. Cat {i % 3}. Brand {i % 2}. \n" for i in range(n_items)))
    write(d / f"{name}.item2index", "".join(f"A{i:03d}\t{i}\n" for i in range(n_items)))
    line = lambda u, s, i: f"{u}\t{' '.join(map(str, s[max(0, i - L):i]))}\t{s[i]}\n"
    train = valid = test = INTER_HEADER
    for u, s in seqs.items():
        n = len(s)
        train += "".join(line(u, s, i) for i in range(n - 3, 0, -1))
        valid += line(u, s, n - 2)
        if u not in drop_test:
            test += line(u, s, n - 1)
    write(d / f"{name}.train.inter", train)
    write(d / f"{name}.valid.inter", valid)
    write(d / f"{name}.test.inter", test)


def sequences(d) -> dict[int, list[int]]:
    return {int(u): g.item_id.tolist() for u, g in d.events.groupby("user_id")}


def test_recbole_rebuilds_sequences_longer_than_the_history_cut(tmp_path):
    rng = np.random.default_rng(0)
    seqs = {0: rng.integers(0, 30, 60).tolist(),   # 60 events: histories cut at 50
            1: [4, 5, 6, 7, 4, 5],                  # a repeat
            2: [9, 8, 7],                           # no training rows at all
            7: rng.integers(0, 30, 52).tolist()}
    write_recbole(tmp_path, seqs, n_items=30, L=50)
    d = read_recbole(tmp_path, name="Sci")
    assert sequences(d) == seqs
    assert d.users is None  # no .user2index written


def test_recbole_chains_windows_with_a_short_cut(tmp_path):
    # with L = 3 every long user is rebuilt by chaining 4-item windows backwards
    seqs = {0: [1, 2, 3, 4, 5, 1, 2, 6, 7, 8, 9], 1: [3, 2, 1, 0, 3, 2, 1, 5]}
    write_recbole(tmp_path, seqs, n_items=10, L=3)
    d = read_recbole(tmp_path, name="Sci")
    assert sequences(d) == seqs
    # leave-one-out with the same cut reproduces the test rows
    test = leave_one_out(d, max_history=3).test.to_frame()
    assert [h.tolist() for h in test.history] == [[6, 7, 8], [3, 2, 1]]
    assert test.target.tolist() == [9, 5]


def test_recbole_user_missing_from_test_keeps_longest_sequence(tmp_path):
    seqs = {0: [1, 2, 3, 4, 5, 6], 1: [6, 5, 4, 3, 2]}
    write_recbole(tmp_path, seqs, n_items=7, L=50, drop_test=(1,))
    assert sequences(read_recbole(tmp_path, name="Sci")) == {0: [1, 2, 3, 4, 5, 6], 1: [6, 5, 4, 3]}


def test_recbole_ambiguous_chain_is_an_error(tmp_path):
    # the 2-item run "1 2" follows both 0 and 9, so a cut of L=2 cannot place position 0
    write_recbole(tmp_path, {0: [0, 1, 2, 9, 1, 2, 5, 6]}, n_items=10, L=2)
    with pytest.raises(DataError, match="user 0: cannot rebuild position"):
        read_recbole(tmp_path, name="Sci")


def test_recbole_inconsistent_files(tmp_path):
    write_tiny_recbole(tmp_path)
    write(tmp_path / "Sci.valid.inter", INTER_HEADER + "0\t0 1 2\t1\n1\t3\t2\n")  # test says position 3 is item 3
    with pytest.raises(DataError, match=r"user 0: .inter files disagree on position 3 \(1 vs 3\)"):
        read_recbole(tmp_path, name="Sci")


def test_recbole_bad_and_missing_files(tmp_path):
    write_tiny_recbole(tmp_path)
    write(tmp_path / "Sci.train.inter", INTER_HEADER + "0\t0 x\t2\n")
    with pytest.raises(DataError, match=r"Sci.train.inter:2: expected 'user<TAB>item item"):
        read_recbole(tmp_path, name="Sci")
    write_tiny_recbole(tmp_path)
    (tmp_path / "Sci.test.inter").unlink()
    with pytest.raises(DataError, match=r"Sci.test.inter: file not found"):
        read_recbole(tmp_path, name="Sci")
    write_tiny_recbole(tmp_path)
    write(tmp_path / "Sci.item2index", "B00\t0\nB01\t1\nB02\t2\nB03\t3\nB77\t4\n")
    with pytest.raises(DataError, match=r"Sci.text: no text for 1 item\(s\) of .item2index \(e.g. \['B77'\]\)"):
        read_recbole(tmp_path, name="Sci")
    write_tiny_recbole(tmp_path)
    assert load_source("recbole", str(tmp_path), name="Sci").n_users == 2


@pytest.mark.parametrize("split", ["train", "valid", "test"])
@pytest.mark.parametrize("content", ["", INTER_HEADER], ids=["empty", "header-only"])
def test_recbole_empty_inter_file_is_named(tmp_path, split, content):
    # Before: an empty train/valid file read as "the .inter files disagree", an empty test file
    # silently made the valid rows the test targets, and all three empty raised a bare ValueError.
    write_tiny_recbole(tmp_path)
    write(tmp_path / f"Sci.{split}.inter", content)
    with pytest.raises(DataError) as err:
        read_recbole(tmp_path, name="Sci")
    assert str(err.value).startswith(f"{tmp_path / f'Sci.{split}.inter'}: no interaction rows (the file is empty "
                                     "or holds only its header)")


def test_recbole_all_inter_files_empty_and_empty_item_index(tmp_path):
    write_tiny_recbole(tmp_path)
    for split in ("train", "valid", "test"):
        write(tmp_path / f"Sci.{split}.inter", "")
    with pytest.raises(DataError, match=r"Sci.train.inter: no interaction rows"):
        read_recbole(tmp_path, name="Sci")
    write_tiny_recbole(tmp_path)
    write(tmp_path / "Sci.item2index", "")
    with pytest.raises(DataError, match=r"Sci.item2index: no 'ASIN<TAB>index' lines"):
        read_recbole(tmp_path, name="Sci")


# ---------------------------------------------------------------- MovieLens-100K

ML_ITEMS = [  # id | title | release | video release | url | 19 genre flags
    "1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|"
    "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "2|Café au lait (1993)|01-Jan-1993||http://us.imdb.com/M/title-exact?Cafe|"
    "0|0|0|0|0|1|0|0|0|0|0|0|0|0|1|0|0|0|0",
    "3|unknown||||1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0",
    "4|GoldenEye (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?GoldenEye%20(1995)|"
    "0|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0|1|0|0",
]
ML_DATA = [  # user item rating unixtime
    "1\t4\t5\t881250949", "1\t1\t3\t881250949", "1\t2\t4\t881251000",
    "2\t3\t2\t880000000", "2\t1\t5\t880000100", "2\t4\t1\t880000200",
    "3\t2\t4\t890000000", "3\t3\t1\t890000001",
]
ML_USERS = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067"]


def write_movielens(d: Path) -> None:
    (d / "u.item").write_bytes(("\n".join(ML_ITEMS) + "\n").encode("latin-1"))
    write(d / "u.data", "\n".join(ML_DATA) + "\n")
    write(d / "u.user", "\n".join(ML_USERS) + "\n")


def test_read_movielens(tmp_path):
    write_movielens(tmp_path)
    d = read_movielens(tmp_path)
    it = d.items
    assert it.item_id.tolist() == [1, 2, 3, 4]
    assert it.title.tolist() == ["Toy Story (1995)", "Café au lait (1993)", "unknown", "GoldenEye (1995)"]
    assert it.category.tolist() == ["Animation, Children's, Comedy", "Comedy, Romance", "unknown",
                                    "Action, Adventure, Thriller"]
    assert it.brand.tolist() == ["", "", "", ""]
    assert it.text.tolist() == ["released 01-Jan-1995", "released 01-Jan-1993", "", "released 01-Jan-1995"]
    ev = d.events
    assert ev.user_id.tolist() == [1, 1, 1, 2, 2, 2, 3, 3]
    assert ev.item_id.tolist() == [1, 4, 2, 3, 1, 4, 2, 3]  # the ts tie at 881250949 goes to item 1 first
    assert ev.ts.tolist()[:3] == [881250949, 881250949, 881251000]
    assert ev.rating.tolist() == [3, 5, 4, 2, 5, 1, 4, 1]
    u = d.users
    assert u.user_id.tolist() == [1, 2, 3] and u.age.tolist() == [24, 53, 23]
    assert u.occupation.tolist() == ["technician", "other", "writer"] and u.zip.tolist()[0] == "85711"


def test_read_movielens_min_rating_drops_short_users(tmp_path):
    write_movielens(tmp_path)
    d = read_movielens(tmp_path, min_rating=3)
    # users 2 and 3 keep one rating >= 3 each, too few for an example
    assert d.events.user_id.tolist() == [1, 1, 1] and d.events.item_id.tolist() == [1, 4, 2]
    assert load_source("movielens", str(tmp_path), min_rating=4).events.item_id.tolist() == [4, 2]


def test_read_movielens_errors(tmp_path):
    write_movielens(tmp_path)
    write(tmp_path / "u.user", "1|24|M|technician\n")
    with pytest.raises(DataError, match=r"u.user: expected 5 '\|'-separated fields per line, found 4"):
        read_movielens(tmp_path)
    write_movielens(tmp_path)
    write(tmp_path / "u.data", "1\t4\tfive\t881250949\n")
    with pytest.raises(DataError, match="u.data: fields must be integers"):
        read_movielens(tmp_path)
    (tmp_path / "u.item").unlink()
    with pytest.raises(DataError, match="u.item: file not found"):
        read_movielens(tmp_path)


@pytest.mark.parametrize("name", ["u.data", "u.item", "u.user"])
def test_read_movielens_empty_file_is_named(tmp_path, name):
    write_movielens(tmp_path)
    write(tmp_path / name, "")
    with pytest.raises(DataError, match=rf"{name}: the file is empty; MovieLens-100K's"):
        read_movielens(tmp_path)
