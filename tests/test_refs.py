import pytest

import tl_featureflow as ff
from tl_featureflow.refs import FeatureRef, hook_aliases, hook_name, sae_hook_name, site_of_hook


def test_parse_and_str_round_trip():
    ref = FeatureRef.parse("12/res/4230")
    assert ref == FeatureRef(layer=12, site="res", index=4230)
    assert str(ref) == "12/res/4230"
    for text in ["0/mlp/0", "7/att/88", "29/res/2303"]:
        assert str(FeatureRef.parse(text)) == text
    assert FeatureRef.parse(" 3 / att / 5 ") == FeatureRef(3, "att", 5)
    assert FeatureRef.parse(ref) is ref


def test_refs_are_frozen_hashable_and_ordered_along_the_forward_pass():
    refs = [FeatureRef(2, "res", 0), FeatureRef(1, "mlp", 9), FeatureRef(1, "att", 3), FeatureRef(1, "att", 1)]
    assert sorted(refs) == [FeatureRef(1, "att", 1), FeatureRef(1, "att", 3), FeatureRef(1, "mlp", 9),
                            FeatureRef(2, "res", 0)]
    assert len({FeatureRef(1, "res", 1), FeatureRef.parse("1/res/1")}) == 1
    with pytest.raises(AttributeError):
        refs[0].layer = 5  # type: ignore[misc]


@pytest.mark.parametrize("bad", ["12/resid/4", "12/res", "a/res/1", "-2/res/1", "-1/mlp/1", "1/res/-2", "", "1/res/1/2"])
def test_parse_rejects_bad_text_naming_it(bad):
    with pytest.raises(ff.FeatureFlowError, match="expected"):
        FeatureRef.parse(bad)


@pytest.mark.parametrize("kwargs", [dict(layer=-2, site="res", index=0), dict(layer=-1, site="att", index=0),
                                    dict(layer=1, site="RES", index=0),
                                    dict(layer=True, site="res", index=0), dict(layer=1, site="res", index=1.5)])
def test_constructor_validates(kwargs):
    with pytest.raises(ff.FeatureFlowError):
        FeatureRef(**kwargs)


def test_hook_names():
    assert hook_name("res", 3) == "blocks.3.hook_resid_post"
    assert hook_name("mlp", 0) == "blocks.0.hook_mlp_out"
    assert hook_name("att", 29) == "blocks.29.hook_attn_out"
    assert FeatureRef(4, "mlp", 1).hook_name == "blocks.4.hook_mlp_out"
    assert sae_hook_name("res", 3) == "blocks.3.hook_resid_post.hook_sae_acts_post"
    assert hook_aliases("res", 3) == ("blocks.3.hook_resid_post", "blocks.4.hook_resid_pre")
    assert hook_aliases("mlp", 3) == ("blocks.3.hook_mlp_out",)
    with pytest.raises(ff.FeatureFlowError, match="unknown site"):
        hook_name("resid", 3)  # type: ignore[arg-type]


def test_site_of_hook_inverts_hook_name():
    for site in ("res", "mlp", "att"):
        for layer in (0, 5):
            assert site_of_hook(hook_name(site, layer)) == (site, layer)
    assert site_of_hook("blocks.4.hook_resid_pre") == ("res", 3)
    assert site_of_hook("blocks.0.hook_resid_pre") == ("res", -1)          # the embedding SAE
    assert hook_name("res", -1) == "blocks.0.hook_resid_pre" and hook_aliases("res", -1) == ("blocks.0.hook_resid_pre",)
    assert site_of_hook("blocks.4.attn.hook_z") is None
