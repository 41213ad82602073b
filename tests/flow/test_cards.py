"""Feature cards on planted banks: neighbours, contexts and histogram are the tracer's and the contexts' own."""

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow.flow.cards import FeatureCard, build_card, build_cards, load_cards, save_cards
from tl_featureflow.flow.contexts import collect_top_contexts
from tl_featureflow.synthetic import planted_chain_bank, tiny_model
from tl_featureflow.viz import plot
from tl_featureflow.viz.cards import CardView, card_html, card_id, cards_html


@pytest.fixture(scope="module")
def planted():
    model, (bank, truth) = tiny_model(), planted_chain_bank()
    tokens = torch.randint(0, 100, (6, 16), generator=torch.Generator().manual_seed(1))
    return model, bank, truth, tokens, collect_top_contexts(model, bank, tokens, n=5, progress=False)


def test_a_card_holds_the_planted_neighbours_and_the_contexts(planted):
    model, bank, truth, tokens, contexts = planted
    tracer = ff.FlowTracer(bank, model, contexts=contexts)
    card = build_card(truth.chain[2], tracer=tracer)
    # the planted chain: 1/res/7 -> 2/res/1 -> 3/res/5, and 2/mlp/0 feeds 2/res/1 at cosine 0.8
    assert str(card.predecessors["res"][0][0]) == truth.chain[1]
    assert card.predecessors["res"][0][1] == pytest.approx(truth.chain_cosines[1], abs=1e-5)
    assert str(card.predecessors["mlp"][0][0]) == truth.module_of_chain2[0]
    assert card.scores["mlp"] == pytest.approx(truth.module_of_chain2[1], abs=1e-5)
    assert str(card.successors[0][0]) == truth.chain[3]
    assert card.label == contexts.label(card.ref) and card.labels[truth.chain[1]] == contexts.label(truth.chain[1])
    assert [c.activation for c in card.contexts] == [h.activation for h in contexts.highlighted(card.ref)]
    assert sum(card.hist_counts) == round(contexts.density(card.ref) * contexts.n_tokens)
    assert [t for t, _ in card.lens] == [t for t, _ in tracer.labels.logit_lens(card.ref, 8)]
    lens_values = [v for _, v in card.suppressed]
    assert lens_values == sorted(lens_values) and lens_values[0] < card.lens[-1][1]
    # a module feature: its predecessors are res(L-1), its successors the res(L) features it feeds
    module = build_card(truth.module_of_chain2[0], tracer=tracer)
    assert set(module.predecessors) == {"res"} and str(module.successors[0][0]) == truth.chain[2]


def test_contexts_from_tokens_equal_given_contexts_and_cards_round_trip(planted, tmp_path):
    model, bank, truth, tokens, contexts = planted
    from_tokens = build_card(truth.chain[2], model=model, bank=bank, tokens=tokens, progress=False)
    given = build_card(truth.chain[2], model=model, bank=bank, contexts=contexts)
    n = len(given.contexts)                              # the fixture kept 5, build_card keeps up to 8
    assert [c.activation for c in from_tokens.contexts][:n] == pytest.approx([c.activation for c in given.contexts])
    cards = build_cards(truth.chain, ff.FlowTracer(bank, model, contexts=contexts))
    again = load_cards(save_cards(cards, tmp_path / "cards.json"))
    assert again == cards and isinstance(again[0], FeatureCard)
    with pytest.raises(ff.FeatureFlowError, match="needs the bank"):
        build_card("2/res/1")
    with pytest.raises(ff.FeatureFlowError, match="needs the model"):
        build_card("2/res/1", bank=bank, tokens=tokens)


def test_card_html_shades_tokens_and_links_only_present_cards(planted):
    model, bank, truth, _, contexts = planted
    cards = build_cards(truth.chain[1:3], ff.FlowTracer(bank, model, contexts=contexts))
    page = cards_html(cards)
    assert page.count("class='ff-card'") == 2
    assert f"href='#{card_id(truth.chain[1])}'" in page               # 2/res/1's predecessor has a card here
    assert f"href='#{card_id(truth.chain[3])}'" not in page           # 3/res/5 has none on this page
    first = cards[0].contexts[0]
    assert page.count("ff-tok ff-fire") == sum(len(c.contexts) for c in cards)
    assert f"title='{first.acts[first.firing]:.3f}'" in page
    assert "rgba(255, 140, 0, 1.00)" in card_html(cards[0])            # the strongest firing token, full shade
    view = plot.feature_card(cards[0])
    assert isinstance(view, CardView) and "<style>" in view._repr_html_() and " open>" in view._repr_html_()
    computed = plot.feature_card(truth.chain[2], model=model, bank=bank, contexts=contexts)
    assert computed.card.ref == ff.FeatureRef.parse(truth.chain[2])


def test_a_card_page_is_one_offline_file(planted, tmp_path):
    model, bank, truth, _, contexts = planted
    path = plot.feature_card(truth.chain[0], model=model, bank=bank, contexts=contexts).save(tmp_path / "card.html")
    text = path.read_text()
    assert text.startswith("<!doctype html>") and "http" not in text and "<script" not in text
