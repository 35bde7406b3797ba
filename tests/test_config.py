"""CacheConfig and CodecSpec: presets, content equality, names, and clear errors for bad values."""

import pytest

from tq_mlx import PRESETS, CacheConfig, CodecSpec, resolve_config


def test_configs_compare_by_content_not_by_name():
    explicit = CacheConfig(keys=CodecSpec(bits=4, center="rope"), values=CodecSpec(bits=4))
    assert explicit == resolve_config("k4v4") and explicit.name == "custom"
    assert resolve_config("k4v4-rope") == resolve_config("k4v4") != resolve_config("k4v4-static")


def test_presets_centre_keys_before_rope_unless_static():
    for name in ("k4v4", "k3v3", "k2v2", "k4v4-fast", "k3v3-tcq", "2.5", "k5v3"):
        cfg = resolve_config(name)
        assert cfg.keys.center == "rope" and cfg.values.center is True, name
    assert (
        resolve_config("k4v4-static").keys.center is True and resolve_config("k3v3-fast-static").keys.grid == "uniform"
    )


def test_an_override_that_changes_a_preset_renames_it():
    cfg = resolve_config("k4v4", fp_window=64)
    assert cfg.fp_window == 64 and cfg.name == "k4v4+fp_window=64"


def test_an_override_that_changes_nothing_keeps_the_name():
    assert resolve_config("k4v4", fp_window=0).name == "k4v4"


def test_kxvy_strings_resolve_to_whole_and_fractional_bits():
    assert resolve_config("k3v2").keys.bits == 3 and resolve_config("k2.5v2.5").values.bits == 2.5


@pytest.mark.parametrize(
    "bits,err",
    [("4", TypeError), (True, TypeError), (2.7, ValueError), (0, ValueError), (9, ValueError), (None, TypeError)],
)
def test_bad_bits_are_refused(bits, err):
    with pytest.raises(err, match="bits"):
        CodecSpec(bits=bits)


def test_unknown_codec_and_grid_are_refused():
    with pytest.raises(ValueError, match="codec"):
        CodecSpec(codec="pq")
    with pytest.raises(ValueError, match="grid"):
        CodecSpec(grid="log")


def test_query_weighting_takes_true_false_or_full():
    with pytest.raises(ValueError, match="query_weighting"):
        CodecSpec(query_weighting=1)


def test_unknown_override_lists_the_options():
    with pytest.raises(TypeError, match="fp_windw.*fp_window"):
        resolve_config("k4v4", fp_windw=8)


@pytest.mark.parametrize("field", ["fp_window", "fp_sink", "boundary_layers", "quant_start", "seed"])
def test_negative_or_non_integer_options_are_refused(field):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=field):
            resolve_config("k4v4", **{field: bad})


def test_the_k3v4_duplicate_preset_is_gone():
    assert "3.5" not in PRESETS and "k3v4" in PRESETS


def test_config_round_trips_through_json():
    cfg = resolve_config("3.5-split", fp_window=16)
    assert CacheConfig.from_json(cfg.to_json()) == cfg
