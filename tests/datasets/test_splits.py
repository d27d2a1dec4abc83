import pytest

from advface.datasets.splits import split_identities


def _identities():
    names = []
    for i in range(300):
        names.extend([f"p{i:03d}"] * (1 + i % 4))  # 1..4 photos each
    return names


def test_groups_are_disjoint_and_cover_everyone():
    split = split_identities(_identities(), seed=0)
    groups = [split.defender, split.attacker, split.evaluation]
    assert sum(map(len, groups)) == 300
    assert not (split.defender & split.attacker) and not (split.defender & split.evaluation)
    assert not (split.attacker & split.evaluation)
    assert abs(len(split.defender) - len(split.attacker)) <= 1


def test_evaluation_people_have_several_photos():
    names = _identities()
    split = split_identities(names, seed=0, eval_fraction=0.3)
    assert all(names.count(n) >= 2 for n in split.evaluation)
    assert len(split.evaluation) == round(225 * 0.3)  # 225 people have >= 2 photos


def test_split_is_reproducible_and_seeded():
    names = _identities()
    assert split_identities(names, seed=3) == split_identities(list(reversed(names)), seed=3)
    assert split_identities(names, seed=3).evaluation != split_identities(names, seed=4).evaluation
    with pytest.raises(ValueError):
        split_identities(names, eval_fraction=1.5)
    with pytest.raises(ValueError):
        split_identities(names).group("nobody")
