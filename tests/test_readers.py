"""RecBole/UniSRec atomic files, MovieLens in its three layouts and Parquet part folders, on
small fixtures written here; malformed rows are named by file and line."""

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from karma.data import (DataError, SyntheticConfig, generate, leave_one_out, load_source, read_movielens,
                        read_parquet, read_recbole, write_parquet)
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
    with pytest.raises(DataError, match=r"u.user:1: expected 5 '\|'-separated fields .* \(4 fields instead of 5\)"):
        read_movielens(tmp_path)
    write_movielens(tmp_path)
    write(tmp_path / "u.data", "\n".join(ML_DATA[:5] + ["1\t4\tfive\t881250949"]) + "\n")
    with pytest.raises(DataError, match=r"u.data:6: expected 4 tab-separated integers .*\(rating 'five' is not an "
                                        r"integer\); fix or remove that line"):
        read_movielens(tmp_path)
    write_movielens(tmp_path)
    write(tmp_path / "u.data", "\n".join(ML_DATA + ["3\t9\t4\t890000002"]) + "\n")
    with pytest.raises(DataError, match=r"u.data:9: .*\(movie 9 is not in u.item\); add the movie to u.item"):
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


# ---------------------------------------------------------------- MovieLens CSV layout (ml-latest, ml-25m)

MOVIES_CSV = """movieId,title,genres
1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy
11,"American President, The (1995)",Comedy|Drama|Romance
29,"City of Lost Children, The (Cit\u00e9 des enfants perdus, La) (1995)",Adventure|Drama|Fantasy
40,"Pelle, ""the Conqueror"" (1987)",Drama
50,Unseen (2020),(no genres listed)
"""
RATINGS_CSV = """userId,movieId,rating,timestamp
1,29,3.5,1260759144
1,11,2.5,1260759144
1,1,4.0,1260759100

2,40,0.5,1112484580
2,1,5.0,1112484600
3,11,4.5,1000000000
"""


def test_read_movielens_csv_layout(tmp_path):
    write(tmp_path / "movies.csv", "\ufeff" + MOVIES_CSV)  # a byte-order mark, as spreadsheets save CSV
    write(tmp_path / "ratings.csv", RATINGS_CSV)
    d = read_movielens(tmp_path)
    assert d.name == tmp_path.name and d.users is None
    it = d.items
    assert it.item_id.tolist() == [1, 11, 29, 40, 50]  # every movie, rated or not
    assert it.title.tolist() == ["Toy Story (1995)", "American President, The (1995)",
                                 "City of Lost Children, The (Cit\u00e9 des enfants perdus, La) (1995)",
                                 'Pelle, "the Conqueror" (1987)', "Unseen (2020)"]
    assert it.category.tolist() == ["Adventure, Animation, Children, Comedy, Fantasy", "Comedy, Drama, Romance",
                                    "Adventure, Drama, Fantasy", "Drama", ""]
    assert it.brand.tolist() == [""] * 5 and it.text.tolist() == [""] * 5
    ev = d.events  # user 3 has one rating: too few for an example
    assert ev.user_id.tolist() == [1, 1, 1, 2, 2]
    assert ev.item_id.tolist() == [1, 11, 29, 40, 1]  # the ts tie at 1260759144 goes to item 11 first
    assert ev.ts.tolist() == [1260759100, 1260759144, 1260759144, 1112484580, 1112484600]
    assert ev.rating.tolist() == [4.0, 2.5, 3.5, 0.5, 5.0] and ev.rating.dtype == np.float64
    kept = load_source("movielens", str(tmp_path), min_rating=3.5).events
    assert kept.item_id.tolist() == [1, 29]  # half stars compare as numbers; user 2 keeps one rating only


@pytest.mark.parametrize("line, bad, message", [
    (3, "1,11,2.5", r"\(3 fields instead of 4\); fix or remove that line"),
    (3, "1,eleven,2.5,1260759144", r"\(movieId 'eleven' is not an integer\)"),
    (5, "1,1,4.0,", r"\(timestamp '' is not an integer\)"),
    (6, "2,41,0.5,1112484580", r"\(movie 41 is not in movies.csv\); add the movie to movies.csv or remove that line"),
    (6, "2,40,nan,1112484580", r"\(rating nan is not a finite number\)"),
])
def test_movielens_csv_bad_ratings_line_is_named(tmp_path, line, bad, message):
    lines = RATINGS_CSV.splitlines()
    lines[line - 1] = bad
    write(tmp_path / "movies.csv", MOVIES_CSV)
    write(tmp_path / "ratings.csv", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_movielens(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'ratings.csv'}:{line}: expected 'userId,movieId,rating,timestamp'")
    assert re.search(message, str(err.value)), str(err.value)


def test_movielens_csv_bad_movies(tmp_path):
    write(tmp_path / "ratings.csv", RATINGS_CSV)
    unquoted = MOVIES_CSV.replace('"American President, The (1995)"', "American President, The (1995)")
    write(tmp_path / "movies.csv", unquoted)
    with pytest.raises(DataError, match=r"movies.csv:3: expected 'movieId,title,genres' with a title holding commas "
                                        r"in double quotes, got '11,American President.* \(4 fields instead of 3\)"):
        read_movielens(tmp_path)
    write(tmp_path / "movies.csv", MOVIES_CSV.replace("50,Unseen", "11,Unseen"))
    with pytest.raises(DataError, match=r"movies.csv:6: .*\(movie id 11 is listed again\); keep one line per movie"):
        read_movielens(tmp_path)
    write(tmp_path / "movies.csv", "movieId,name,genres\n1,Toy Story (1995),Comedy\n")
    with pytest.raises(DataError, match=r"movies.csv:1: the header 'movieId,name,genres' lacks "
                                        r"column\(s\) \['title'\]"):
        read_movielens(tmp_path)
    (tmp_path / "movies.csv").unlink()
    with pytest.raises(DataError, match=r"movies.csv: file not found; the MovieLens CSV layout needs ratings.csv and"):
        read_movielens(tmp_path)


# ---------------------------------------------------------------- MovieLens '::' layout (ML-1M, ML-10M)

MOVIES_DAT = ["1::Toy Story (1995)::Animation|Children's|Comedy",
              "2::Caf\u00e9 au lait (1993)::Comedy|Romance",
              "3::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi"]
RATINGS_DAT = ["1::3::5::978300760", "1::1::3::978300760", "1::2::4::978301000",
               "2::3::2::978000000", "2::1::5::978000100"]
USERS_DAT = ["1::F::1::10::48067", "2::M::56::16::70072"]


def write_dat(d: Path, encoding: str = "latin-1", users: bool = True) -> None:
    (d / "movies.dat").write_bytes(("\n".join(MOVIES_DAT) + "\n").encode(encoding))
    write(d / "ratings.dat", "\n".join(RATINGS_DAT) + "\n")
    if users:
        write(d / "users.dat", "\n".join(USERS_DAT) + "\n")


@pytest.mark.parametrize("encoding", ["latin-1", "utf-8"])  # ML-1M is latin-1, ML-10M UTF-8
def test_read_movielens_dat_layout(tmp_path, encoding):
    write_dat(tmp_path, encoding)
    d = read_movielens(tmp_path)
    it = d.items
    assert it.item_id.tolist() == [1, 2, 3]
    assert it.title.tolist() == ["Toy Story (1995)", "Caf\u00e9 au lait (1993)",
                                 "Star Wars: Episode IV - A New Hope (1977)"]
    assert it.category.tolist() == ["Animation, Children's, Comedy", "Comedy, Romance", "Action, Sci-Fi"]
    ev = d.events
    assert ev.user_id.tolist() == [1, 1, 1, 2, 2] and ev.item_id.tolist() == [1, 3, 2, 3, 1]
    assert ev.rating.tolist() == [3.0, 5.0, 4.0, 2.0, 5.0]
    assert d.users.user_id.tolist() == [1, 2] and d.users.gender.tolist() == ["F", "M"]
    assert d.users.age.tolist() == [1, 56] and d.users.occupation.tolist() == [10, 16]
    assert d.users.zip.tolist() == ["48067", "70072"]


def test_movielens_dat_without_users_and_half_stars(tmp_path):
    write_dat(tmp_path, users=False)
    write(tmp_path / "ratings.dat", "1::3::4.5::978300760\n1::1::0.5::978300761\n")  # ML-10M's half stars
    d = read_movielens(tmp_path, min_rating=0.5)
    assert d.users is None and d.events.rating.tolist() == [4.5, 0.5]


@pytest.mark.parametrize("file, line, bad, message", [
    ("ratings.dat", 4, "2::3::2", r"got '2::3::2' \(3 fields instead of 4\)"),
    ("ratings.dat", 2, "1::1::3::yesterday", r"\(ts 'yesterday' is not an integer\)"),
    ("ratings.dat", 5, "2::7::5::978000100", r"\(movie 7 is not in movies.dat\); add the movie to movies.dat"),
    ("movies.dat", 3, "3::Star Wars", r"\(2 fields instead of 3\)"),
    ("users.dat", 2, "2::M::fifty::16::70072", r"\(age 'fifty' is not an integer\)"),
])
def test_movielens_dat_bad_line_is_named(tmp_path, file, line, bad, message):
    write_dat(tmp_path)
    lines = {"ratings.dat": RATINGS_DAT, "movies.dat": MOVIES_DAT, "users.dat": USERS_DAT}[file].copy()
    lines[line - 1] = bad
    write(tmp_path / file, "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        read_movielens(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / file}:{line}: expected '"), str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


def test_movielens_layout_is_recognised_by_its_files(tmp_path):
    with pytest.raises(DataError, match=r"no MovieLens ratings file; expected u.data \(ML-100K\), ratings.csv"):
        read_movielens(tmp_path)
    write_dat(tmp_path)
    write(tmp_path / "ratings.csv", RATINGS_CSV)
    with pytest.raises(DataError, match=r"holds ratings.csv and ratings.dat; keep one MovieLens release per folder"):
        read_movielens(tmp_path)
    (tmp_path / "movies.dat").unlink()
    (tmp_path / "ratings.csv").unlink()
    with pytest.raises(DataError, match=r"movies.dat: file not found; the MovieLens '::' layout needs"):
        read_movielens(tmp_path)


# ---------------------------------------------------------------- a bad row deep inside a large file

def test_bad_row_deep_in_a_large_inter_file_is_named_by_line(tmp_path):
    n = 250_000
    write_tiny_recbole(tmp_path)
    rows = [f"{u % 2}\t0 1\t2\n" for u in range(n)]
    rows[200_000 - 2] = "1\t0 1 3x\t2\n"  # line 200,000 (the header is line 1)
    write(tmp_path / "Sci.train.inter", INTER_HEADER + "".join(rows))
    with pytest.raises(DataError, match=r"Sci.train.inter:200000: expected 'user<TAB>item item ...<TAB>item' "
                                        r"with integer indices, got '1\\t0 1 3x\\t2' "
                                        r"\(history item '3x' is not an integer\)"):
        read_recbole(tmp_path, name="Sci")
    rows[200_000 - 2] = "1\t0 1\t2\t7\n"
    write(tmp_path / "Sci.train.inter", INTER_HEADER + "".join(rows))
    with pytest.raises(DataError, match=r"Sci.train.inter:200000: .*\(4 fields instead of 3\)"):
        read_recbole(tmp_path, name="Sci")


@pytest.mark.parametrize("bad, message", [("7,1,4.0", r"\(3 fields instead of 4\)"),
                                          ("7,1,4.0,1x", r"\(timestamp '1x' is not an integer\)"),
                                          ("7,12,4.0,100", r"\(movie 12 is not in movies.csv\)")])
def test_bad_row_deep_in_a_large_ratings_file_is_named_by_line(tmp_path, bad, message):
    write(tmp_path / "movies.csv", MOVIES_CSV)
    n = 300_000
    rows = [f"{u // 10},{(1, 11, 29, 40)[u % 4]},{(u % 10) / 2 + 0.5},{1_000_000 + u}\n" for u in range(n)]
    rows[123_456] = "\n"  # blank lines are skipped, but still counted
    rows[250_000 - 2] = bad + "\n"
    write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n" + "".join(rows))
    with pytest.raises(DataError) as err:
        read_movielens(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'ratings.csv'}:250000: expected"), str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


# ---------------------------------------------------------------- Parquet: a folder of part files per table

def test_parquet_part_folders_read_equal_to_single_files(tmp_path):
    d = generate(SyntheticConfig(n_users=60, n_items=50, n_categories=4, n_brands=6, query_prob=0.3, seed=3))
    write_parquet(d, tmp_path / "single")
    parts = tmp_path / "parts"
    (parts / "items").mkdir(parents=True)
    (parts / "events.parquet").mkdir()  # as Spark names its output folders
    items, events = (pq.read_table(tmp_path / "single" / f) for f in ("items.parquet", "events.parquet"))
    for i, lo in enumerate(range(0, items.num_rows, 20)):  # row order across parts is the items' row order
        pq.write_table(items.slice(lo, 20), parts / "items" / f"part-{i:05d}.parquet")
    cuts = [0, 100, 101, 350, events.num_rows]
    for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        sub = parts / "events.parquet" / f"day={i}"  # nested folders are read too
        sub.mkdir()
        pq.write_table(events.slice(lo, hi - lo), sub / f"part-{i}.parquet")
    (parts / "events.parquet" / "_SUCCESS").write_text("")  # not data
    a, b = read_parquet(tmp_path / "single"), read_parquet(parts)
    pd.testing.assert_frame_equal(a.items, b.items)
    pd.testing.assert_frame_equal(a.events.drop(columns="shown"), b.events.drop(columns="shown"))
    assert [s.tolist() for s in a.events.shown] == [s.tolist() for s in b.events.shown]
    assert a.items.title.tolist() == d.items.title.tolist() and len(b.events) == len(d.events)


def test_parquet_part_folder_errors_name_the_part(tmp_path):
    d = generate(SyntheticConfig(n_users=30, n_items=40, n_categories=4, n_brands=6, seed=1))
    write_parquet(d, tmp_path)
    events = pq.read_table(tmp_path / "events.parquet")
    (tmp_path / "events.parquet").rename(tmp_path / "whole.bin")
    (tmp_path / "events").mkdir()
    pq.write_table(events.slice(0, 50), tmp_path / "events" / "part-0.parquet")
    broken = tmp_path / "events" / "part-1.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))}: not a readable Parquet file \(ArrowInvalid: "):
        read_parquet(tmp_path)
    clash = events.slice(50).set_column(0, "user_id", pa.array([str(u) for u in events["user_id"].to_pylist()[50:]]))
    pq.write_table(clash, broken)
    with pytest.raises(DataError, match=rf"^{re.escape(str(broken))}: its columns do not match part-0.parquet's"):
        read_parquet(tmp_path)
    pq.write_table(events.slice(50), broken)
    assert len(read_parquet(tmp_path).events) == events.num_rows
    (tmp_path / "whole.bin").rename(tmp_path / "events.parquet")
    with pytest.raises(DataError, match=r"both events.parquet and events/ exist; keep one of them"):
        read_parquet(tmp_path)
    (tmp_path / "events.parquet").unlink()
    for f in (tmp_path / "events").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"events: the folder holds no Parquet part files"):
        read_parquet(tmp_path)
