"""Top contexts, histograms and labels: the streaming pass equals a brute-force computation over all activations."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import tl_featureflow as ff
from tl_featureflow import FlowTracer, FlowTransformer
from tl_featureflow.flow.contexts import HIST_EDGES, TopContexts, collect_top_contexts, contexts_dir, feature_contexts
from tl_featureflow.flow.labels import FeatureLabels
from tl_featureflow.synthetic import D_VOCAB, sae_from_decoder

N, LEFT, RIGHT = 4, 3, 2


@pytest.fixture
def corpus():
    return torch.randint(0, D_VOCAB, (7, 10), generator=torch.Generator().manual_seed(3))


def _all_activations(model, bank, corpus):
    _, feats = FlowTransformer.from_hooked(model).run_with_features(corpus, bank=bank)
    return feats


def test_streaming_top_contexts_equal_brute_force(tiny_model, corpus, bank_factory):
    bank = bank_factory(layers=[0, 2])
    contexts = collect_top_contexts(tiny_model, bank, corpus, n=N, batch_size=2, left=LEFT, right=RIGHT,
                                    progress=False)
    seq = corpus.shape[1]
    for key, all_acts in _all_activations(tiny_model, bank, corpus).items():
        acts = all_acts[:, 1:]                         # position 0 skipped
        flat = acts.reshape(-1, acts.shape[-1]).T      # [d_sae, docs * (seq - 1)]
        top = flat.topk(N, dim=1)
        fired = top.values > 0
        torch.testing.assert_close(contexts.values[key], torch.where(fired, top.values, 0.0), rtol=1e-5, atol=1e-5)
        docs, pos = top.indices // (seq - 1), top.indices % (seq - 1) + 1
        assert torch.equal(contexts.doc[key][fired], docs[fired]) and torch.equal(contexts.pos[key][fired], pos[fired])
        assert bool((contexts.doc[key][~fired] == -1).all())
        # windows: the tokens around each position and the feature's activation on each, -1 past the row
        for f, slot in [(0, 0), (3, 1), (7, 3)]:
            if not fired[f, slot]:
                continue
            d, p = int(docs[f, slot]), int(pos[f, slot])
            for j, at in enumerate(range(p - LEFT, p + RIGHT + 1)):
                inside = 0 <= at < seq
                assert int(contexts.window_tokens[key][f, slot, j]) == (int(corpus[d, at]) if inside else -1)
                expected = float(all_acts[d, at, f]) if inside else 0.0
                assert float(contexts.window_acts[key][f, slot, j]) == pytest.approx(expected, abs=1e-5)
        # histogram of positive activations with the same edges, and the sums
        positive = acts.reshape(-1, acts.shape[-1])
        for f in range(positive.shape[1]):
            values = positive[:, f][positive[:, f] > 0].double()
            bins = torch.bucketize(values.clamp(HIST_EDGES[0], HIST_EDGES[-1] * 0.999), HIST_EDGES, right=True) - 1
            expected = torch.bincount(bins, minlength=len(HIST_EDGES) - 1)
            assert torch.equal(contexts.hist[key][f], expected), (key, f)
        torch.testing.assert_close(contexts.act_sum[key], positive.double().sum(0), rtol=1e-6, atol=1e-6)
    assert contexts.n_tokens == corpus.shape[0] * (seq - 1)

    ref = ff.FeatureRef(2, "mlp", 5)
    examples = contexts.examples(ref, window=2)
    assert [e.activation for e in examples] == [v for v in contexts.values[ref.key][5].tolist() if v > 0]
    first = examples[0]
    assert f"[<{int(corpus[first.doc, first.pos])}>]" in first.text


def test_density_mean_and_quantiles_match_the_activations(tiny_model, corpus, bank_factory):
    bank = bank_factory(layers=[1])
    contexts = collect_top_contexts(tiny_model, bank, corpus, n=N, progress=False)
    acts = _all_activations(tiny_model, bank, corpus)[("res", 1)][:, 1:].reshape(-1, bank.d_sae("res", 1))
    checked = 0
    for f in range(acts.shape[1]):
        values = acts[:, f][acts[:, f] > 0]
        ref = f"1/res/{f}"
        assert contexts.density(ref) == pytest.approx(len(values) / acts.shape[0])
        if len(values) < 8:
            continue
        checked += 1
        assert contexts.mean_active(ref) == pytest.approx(float(values.mean()), rel=1e-5)
        for q in (0.25, 0.5, 0.9, 1.0):   # lies in the bin of the order statistic ceil(q * n)
            kth = float(values.sort().values[math.ceil(q * len(values)) - 1])
            b = int(torch.bucketize(torch.tensor(kth, dtype=torch.float64), HIST_EDGES, right=True)) - 1
            assert float(HIST_EDGES[b]) * (1 - 1e-9) <= contexts.quantile(ref, q) <= float(HIST_EDGES[b + 1]) * (1 + 1e-9)
    assert checked > 5
    with pytest.raises(ff.InvalidArgumentError, match="quantile"):
        contexts.quantile("1/res/0", 1.5)


def test_a_stream_of_batches_equals_the_tensor_and_labels_read_well(tiny_model, corpus, bank_factory):
    bank = bank_factory(layers=[2])
    whole = collect_top_contexts(tiny_model, bank, corpus, n=N, progress=False)
    stream = collect_top_contexts(tiny_model, bank, (corpus[i : i + 3] for i in range(0, 7, 3)), n=N, progress=False)
    for name in TopContexts._TABLES:
        for key in bank:
            torch.testing.assert_close(getattr(stream, name)[key], getattr(whole, name)[key], rtol=1e-5, atol=1e-5)
    label = whole.label("2/res/0")
    assert label.count("[") == 1 and " — …" in label
    firing = whole.highlighted("2/res/0")[0]
    assert firing.acts[firing.firing] == pytest.approx(firing.activation)
    silent = torch.zeros_like(whole.values[("res", 2)][0])
    assert whole.label("2/res/0") != "(never fired)" or bool((whole.values[("res", 2)][0] == silent).all())


def test_saved_contexts_reload_and_the_cache_follows_bank_and_texts(tiny_model, corpus, tmp_path, bank_factory):
    bank = bank_factory(layers=[0, 2])
    contexts = collect_top_contexts(tiny_model, bank, corpus, n=N, path=tmp_path / "ctx", progress=False)
    again = TopContexts.load(tmp_path / "ctx")
    assert again.meta == contexts.meta and again.n_tokens == contexts.n_tokens
    for name in TopContexts._TABLES:
        assert all(torch.equal(getattr(again, name)[k], getattr(contexts, name)[k]) for k in bank)
    cached = collect_top_contexts(tiny_model, bank, corpus, n=N, batch_size=3, path=tmp_path / "ctx", progress=False)
    assert all(torch.equal(cached.values[k], contexts.values[k]) for k in bank)
    other = collect_top_contexts(tiny_model, bank, corpus[:3], n=N, path=tmp_path / "ctx", progress=False)
    assert other.n_tokens == 3 * 9 and TopContexts.load(tmp_path / "ctx").n_tokens == 3 * 9

    # feature_contexts: one folder per bank fingerprint and texts; an edited bank misses the cache
    first = feature_contexts(tiny_model, bank, corpus, progress=False)
    folder = contexts_dir(bank, corpus, n=10)
    assert (folder / "contexts.json").is_file() and first.meta["tokens"] == ff._files.tensor_digest(corpus)
    edited = bank_factory(layers=[0, 2])
    with torch.no_grad():
        edited[("res", 2)].W_dec[0] *= -1
    assert contexts_dir(edited, corpus, n=10) != folder
    changed = feature_contexts(tiny_model, edited, corpus, progress=False)
    assert changed.meta["bank_fingerprint"] != first.meta["bank_fingerprint"]
    assert contexts_dir(bank, corpus[:5], n=10) != folder
    with pytest.raises(ff.FeatureFlowError, match="without a tokenizer"):
        feature_contexts(tiny_model, bank, progress=False)


def test_tracer_labels_are_contexts_first_then_logit_lens(tiny_model, corpus, bank_factory):
    bank = bank_factory(layers=[0, 1, 2])
    contexts = collect_top_contexts(tiny_model, bank, corpus, n=N, progress=False)
    graph = FlowTracer(bank, contexts=contexts).trace("2/res/0", t_res=-1, t_module=-1)
    fired = [n for n in graph.nodes if contexts.values[n.ref.key][n.ref.index, 0] > 0]
    assert fired and all(n.label == contexts.label(n.ref) for n in fired)
    assert all(n.lens is None for n in graph.nodes)            # no model: no logit lens
    tracer = FlowTracer(bank, tiny_model, contexts=contexts)
    with_model = tracer.trace("2/res/0", t_res=-1, t_module=-1)
    assert [n.label for n in with_model.nodes] == [n.label for n in graph.nodes]
    for n in with_model.nodes:      # the lens only where it beats random directions
        assert n.lens == (tracer.labels.lens_label(n.ref) if tracer.labels.lens_is_signal(n.ref) else None)
    lens_only = FlowTracer(bank, tiny_model, contexts=None)
    assert all(n.label == lens_only.labels.lens_label(n.ref)      # the lens is the only label there is
               for n in lens_only.trace("2/res/0", t_res=-1, t_module=-1).nodes)


def test_the_logit_lens_counts_as_signal_only_past_random_directions(tiny_model):
    """Planted: decoders along unembedding columns (one token each) stand out; random ones
    pass at about the null's 1% rate."""
    W_U = tiny_model.W_U.detach()
    ln_w = tiny_model.ln_final.w.detach() if getattr(tiny_model, "ln_final", None) is not None and \
        getattr(tiny_model.ln_final, "w", None) is not None else torch.ones(W_U.shape[0])
    tokens = W_U[:, :8].T / ln_w                            # through the final norm: exactly column t of W_U
    noise = torch.randn(200, W_U.shape[0], generator=torch.Generator().manual_seed(1))
    bank = ff.SAEBank({("res", 1): sae_from_decoder("res", 1, torch.cat([tokens, noise]))})
    labels = FeatureLabels(bank, tiny_model, contexts=None)
    assert all(labels.lens_is_signal(f"1/res/{i}") for i in range(8))
    false_rate = sum(labels.lens_is_signal(f"1/res/{i}") for i in range(8, 208)) / 200
    assert false_rate <= 0.05
    assert labels.lens_null() == labels.lens_null() and 0 < labels.lens_null() < min(
        labels.lens_z(f"1/res/{i}") for i in range(8))


def test_bad_tokens_are_refused(tiny_model, bank_factory):
    with pytest.raises(ff.FeatureFlowError, match="integer tensor"):
        collect_top_contexts(tiny_model, bank_factory(layers=[0]), torch.zeros(3, 4), progress=False)
    with pytest.raises(ff.InvalidArgumentError, match="outside the vocabulary"):
        collect_top_contexts(tiny_model, bank_factory(layers=[0]), torch.full((3, 4), 10_000), progress=False)
    with pytest.raises(ff.InvalidArgumentError, match="outside the vocabulary"):
        collect_top_contexts(tiny_model, bank_factory(layers=[0]), iter([torch.full((3, 4), 10_000)]), progress=False)


_BOUNDED = textwrap.dedent("""
    import resource, sys
    limit = int(sys.argv[2]) * 2**20                      # the process may hold this much data, no more
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    import torch
    from tl_featureflow.saes.bank import SAEBank
    from tl_featureflow.synthetic import sae_from_decoder, tiny_model
    from tl_featureflow.flow.contexts import collect_top_contexts

    model = tiny_model(d_model=32, n_layers=2)
    W = torch.nn.functional.normalize(torch.randn(8192, 32, generator=torch.Generator().manual_seed(0)), dim=1)
    bank = SAEBank({("res", 1): sae_from_decoder("res", 1, W, arch="topk")})
    rows, seq, batch = int(sys.argv[1]), 64, 32
    gen = torch.Generator().manual_seed(0)
    stream = (torch.randint(0, 100, (batch, seq), generator=gen) for _ in range(rows // batch))
    ctx = collect_top_contexts(model, bank, stream, n=10, progress=False)
    try:                                                  # what keeping every activation would need
        torch.zeros(ctx.n_tokens, 8192)
        fits = 1
    except (MemoryError, RuntimeError):
        fits = 0
    print(ctx.n_tokens, fits, int((ctx.values[("res", 1)][:, 0] > 0).sum()))
""")


@pytest.mark.slow
def test_memory_stays_bounded_on_a_stream_larger_than_memory_allows_for_its_activations():
    """129k positions x 8,192 features = 4.2 GB of activations; the pass runs with 2.5 GB allowed."""
    out = subprocess.run([sys.executable, "-c", _BOUNDED, "2048", "2500"], capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    n_tokens, fits, fired = map(int, out.stdout.split())
    assert n_tokens == 2048 * 63 and n_tokens * 8192 * 4 > 2500 * 2**20
    assert fits == 0, "the memory limit did not bite: all activations would have fit"
    assert fired > 4000                                     # the pass saw real activations


# -- shards of the texts, merged (issue 25) -------------------------------------------------------------
@pytest.fixture
def tied_corpus():
    """Nine rows, two of them repeated: every activation of row 6 (8) equals row 2's (1's) exactly."""
    corpus = torch.randint(0, D_VOCAB, (9, 10), generator=torch.Generator().manual_seed(3))
    corpus[6], corpus[8] = corpus[2], corpus[1]
    return corpus


def _tables_equal(a: TopContexts, b: TopContexts) -> dict[str, bool]:
    return {name: all(torch.equal(getattr(a, name)[k], getattr(b, name)[k]) for k in b.values)
            for name in TopContexts._TABLES}


@pytest.mark.parametrize("cuts", [[0, 4, 9], [0, 2, 6, 9], [0, 3, 5, 9]], ids=["2 shards", "3 shards", "3 unaligned"])
def test_merged_shards_equal_one_pass_over_all_rows(tiny_model, bank_factory, tied_corpus, cuts):
    bank = bank_factory(layers=[0, 2])
    # one row per forward: shards cut between batches would otherwise batch rows differently, and a batched
    # matmul's last bits depend on its batch on some BLAS builds (a fresh machine failed "3 unaligned" so)
    settings = dict(n=N, batch_size=1, left=LEFT, right=RIGHT, progress=False)
    whole = collect_top_contexts(tiny_model, bank, tied_corpus, **settings)
    ties = sum(int(((v[:, 1:] == v[:, :-1]) & (v[:, 1:] > 0)).sum()) for v in whole.values.values())
    assert ties > 10                                   # the repeated rows put equal activations among the top contexts
    parts = [collect_top_contexts(tiny_model, bank, tied_corpus[a:b], first_doc=a, **settings)
             for a, b in zip(cuts, cuts[1:], strict=False)]
    assert parts[1].meta["first_doc"] == cuts[1] and int(parts[1].doc[("res", 0)].max()) >= cuts[1]
    merged = TopContexts.merge(parts, meta=whole.meta)
    assert _tables_equal(merged, whole) == {name: True for name in TopContexts._TABLES}
    assert (merged.n_tokens, merged.meta, merged.n, merged.left, merged.right) == \
        (whole.n_tokens, whole.meta, whole.n, whole.left, whole.right)
    assert TopContexts.merge(parts[::-1], meta=whole.meta).doc[("res", 2)].equal(whole.doc[("res", 2)])  # any order
    assert TopContexts.merge(parts).meta["tokens"] is None           # a shard's digest is not the whole's


def test_equal_activations_are_kept_in_text_order(tiny_model, bank_factory, tied_corpus):
    """Rows 2 and 6 are the same text: where both make a feature's top contexts at one position, row 2 comes first."""
    bank = bank_factory(sites=["res"], layers=[0])
    contexts = collect_top_contexts(tiny_model, bank, tied_corpus, n=8, batch_size=3, progress=False)
    values, doc, pos = contexts.values[("res", 0)], contexts.doc[("res", 0)], contexts.pos[("res", 0)]
    seen = 0
    for f in range(values.shape[0]):
        for a in range(values.shape[1] - 1):
            if values[f, a] > 0 and values[f, a] == values[f, a + 1]:
                assert (int(doc[f, a]), int(pos[f, a])) < (int(doc[f, a + 1]), int(pos[f, a + 1])), (f, a)
                seen += 1
    assert seen > 5


def test_merge_refuses_tables_of_other_settings(tiny_model, bank_factory, tied_corpus):
    bank = bank_factory(sites=["res"], layers=[0])
    a = collect_top_contexts(tiny_model, bank, tied_corpus[:4], n=3, progress=False)
    b = collect_top_contexts(tiny_model, bank, tied_corpus[4:], n=4, first_doc=4, progress=False)
    with pytest.raises(ff.InvalidArgumentError, match=r"part 1 .* differs from part 0 in \['meta', 'n', 'shapes'\]"):
        TopContexts.merge([a, b])
    with pytest.raises(ff.InvalidArgumentError, match="non-empty list of TopContexts"):
        TopContexts.merge([])
