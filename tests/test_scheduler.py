"""The depth-queue scheduler (tgems.scheduling.depth) on the shipped embedded model: its answers equal
EarlyExitClassifier.predict row for row with label sets, taus and goals mixed in flight; cancelled rows are
dropped without leaking slots; audited rows answer at their exit and are checked at full depth."""
import dataclasses
import warnings

import numpy as np
import pytest
import torch

import tgems
from tgems.jumper import NUM_SET_SIGNALS, NUM_SIGNALS, Jumper
from tgems.scheduling.depth import DepthScheduler, QueueFull, predict_rows


@pytest.fixture(scope="module")
def emb():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = tgems.load_backbone("embedded")
        ds = tgems.load_dataset("scenes:test:60")
        a = tgems.EarlyExitClassifier(bb, "embedded:cls", ds.classes[:16])
        b = tgems.EarlyExitClassifier(bb, "embedded:cls", ds.classes[16:40:2], templates=["a photo of {}"])
        r = tgems.EarlyExitClassifier(bb, "embedded:rates", ds.classes[:16])
    return bb, bb.preprocess(list(ds.images)), {"a": a, "b": b, "rates": r}


def distilled(a):
    """`a` with distilled readouts (seeded maps near the identity, both readouts mixed) and a budget Jumper that
    reads the trajectory signals: the issue-27 recipe, whatever the shipped checkpoint holds."""
    g = torch.Generator().manual_seed(0)
    prof = a.profiles.to("cpu")
    n, D = len(prof.layers), prof.text.shape[1]
    prof = dataclasses.replace(prof, readout_weight=torch.eye(D) + 0.1 * torch.randn(n, D, D, generator=g),
                               readout_bias=0.01 * torch.randn(n, D, generator=g),
                               mix=torch.tensor([[0.6, 0.5]]).repeat(n, 1))
    w = a.jumper.for_goal("budget").weight[:, :NUM_SIGNALS + D + NUM_SET_SIGNALS]
    jumper = Jumper(torch.cat([w, torch.tensor([[0.3, 1.0, 2.0]]).repeat(n, 1)], 1),
                    a.jumper.for_goal("budget").bias)
    return tgems.EarlyExitClassifier(a.backbone, None, a.labels, a.templates, jumper=jumper, profiles=prof,
                                     calibration={"goal": "budget", "tau": 0.5})


def _configs(clfs):
    a, b, r = clfs["a"], clfs["b"], clfs["rates"]
    max_drop = tgems.EarlyExitClassifier(a.backbone, None, a.labels, a.templates, jumper=a.jumper,
                                         profiles=a.profiles, calibration={"goal": "max_drop", "tau": 0.8})
    d = distilled(a)
    return [a, a.with_tau(0.3), b, b.with_tau(0.9), max_drop, r, a.with_tau(2.0), d, d.with_tau(0.8)]


def _check_same(rows, ref, clf):
    layers = [r.exit_layer for r in rows]
    assert layers == ref.exit_layers.tolist()
    probs = np.stack([r.probs.numpy() for r in rows])
    assert [clf.labels[i] for i in probs.argmax(1)] == ref.labels
    assert np.allclose(probs, ref.probs, atol=1e-5)
    assert np.allclose([r.flops for r in rows], ref.flops, rtol=1e-9)
    assert np.allclose([r.flops_ratio for r in rows], ref.flops_ratio, rtol=1e-9)
    assert np.allclose(np.stack([r.embedding.numpy() for r in rows]), ref.embeddings, atol=1e-5)


def test_answers_equal_predict_with_mixed_label_sets_and_taus(emb):
    bb, px, clfs = emb
    configs = _configs(clfs)
    refs = [c.predict(px) for c in configs]
    assert len({tuple(r.exit_layers.tolist()) for r in refs}) >= 4  # the taus and label sets really differ
    policies = [c.policy() for c in configs]
    # interleave small chunks of every configuration so that each step mixes policies
    jobs, where = [], []
    for start in range(0, len(px), 7):
        for k, pol in enumerate(policies):
            jobs.append((px[start:start + 7], pol))
            where.append((k, start))
    sched = DepthScheduler(bb, max_batch_size=16)
    out = predict_rows(sched, jobs)
    rows = [[None] * len(px) for _ in configs]
    for (k, start), res in zip(where, out):
        rows[k][start:start + len(res)] = res
    for k, c in enumerate(configs):
        _check_same(rows[k], refs[k], c)
    assert sched.stats["steps"][0] < len(jobs)  # depth-0 steps took rows of several requests at once
    assert sched.inflight == 0 and not sched.busy()
    assert sched.stats["answered"] == len(px) * len(configs)
    occ = sched.occupancy()
    assert occ[0] == pytest.approx(len(px) * len(configs) / (sched.stats["steps"][0] * 16))


def test_background_thread_gives_the_same_answers(emb):
    import threading

    bb, px, clfs = emb
    a = clfs["a"]
    ref = a.predict(px)
    got, done = [None] * len(px), threading.Event()
    left = [len(px)]

    def on_row(i, r):
        got[i] = r
        left[0] -= 1
        if not left[0]:
            done.set()

    sched = DepthScheduler(bb, max_batch_size=8, max_wait_s=0.001).start()
    try:
        sched.submit(px, a.policy(), on_row)
        assert done.wait(60)
    finally:
        sched.stop(60)
    _check_same(got, ref, a)
    assert sched.inflight == 0


def test_cancelled_rows_are_dropped_and_their_slots_return(emb):
    bb, px, clfs = emb
    a = clfs["a"].with_tau(2.0)  # nobody exits early: rows stay in flight until cancelled
    answered = {"keep": 0, "drop": 0}
    sched = DepthScheduler(bb, max_batch_size=8, max_inflight=16)
    sched.submit(px[:10], a.policy(), lambda i, r: answered.__setitem__("drop", answered["drop"] + 1), tag="drop")
    sched.submit(px[10:30], a.policy(), lambda i, r: answered.__setitem__("keep", answered["keep"] + 1), tag="keep")
    for _ in range(3):
        sched.step(flush=True)
    assert sched.inflight > 0
    assert sched.cancel("drop") == 10
    sched.run_until_idle()
    assert answered == {"keep": 20, "drop": 0}
    assert sched.inflight == 0 and sorted(sched.free_slots) == list(range(16)) and not sched.busy()
    assert sched.stats["cancelled"] == 10


def test_queue_full_is_refused(emb):
    bb, px, clfs = emb
    sched = DepthScheduler(bb, max_batch_size=4, queue_size=10)
    sched.submit(px[:8], clfs["a"].policy(), lambda i, r: None)
    with pytest.raises(QueueFull, match="queue is full"):
        sched.submit(px[:3], clfs["a"].policy(), lambda i, r: None)
    sched.run_until_idle()
    sched.submit(px[:10], clfs["a"].policy(), lambda i, r: None)  # room again once the rows went in


def test_audited_rows_answer_at_their_exit_and_count_disagreements(emb):
    bb, px, clfs = emb
    a = clfs["a"].with_tau(0.3)
    ref, full = a.predict(px), a.with_tau(2.0).predict(px)
    logs = []
    sched = DepthScheduler(bb, max_batch_size=16, audit_rate=1.0, audit_max_drop=0.1, audit_delta=0.1,
                           log=logs.append)
    got = [None] * len(px)
    sched.submit(px, a.policy(), lambda i, r: got.__setitem__(i, r), auditable=True)
    sched.run_until_idle()
    _check_same(got, ref, a)
    early = ref.exit_layers < bb.num_layers
    assert sum(r.audited for r in got) == int(early.sum()) > 0
    disagree = int((ref.indices[early] != full.indices[early]).sum())
    assert disagree > 0
    assert (sched.audit.n, sched.audit.disagree) == (int(early.sum()), disagree)
    assert sched.audit.ucb > sched.audit.observed
    assert sched.stats["rows"][-1] == len(px)  # audited rows ran the last block too
    assert sched.inflight == 0
    assert sched.audit.exceeded and len(logs) == 1 and "passes the calibrated max_drop 0.1" in logs[0]


def test_audit_is_seeded(emb):
    bb, px, clfs = emb
    pol_clf = clfs["a"].with_tau(0.3)

    def audited(seed):
        sched = DepthScheduler(bb, max_batch_size=16, audit_rate=0.3, seed=seed)
        got = [None] * len(px)
        sched.submit(px, pol_clf.policy(), lambda i, r: got.__setitem__(i, r), auditable=True)
        sched.run_until_idle()
        return [r.audited for r in got]

    assert audited(1) == audited(1)
    assert 0 < sum(audited(1)) < len(px)


def test_bad_settings_are_refused(emb):
    bb = emb[0]
    with pytest.raises(tgems.TGEMError, match="max_inflight"):
        DepthScheduler(bb, max_batch_size=8, max_inflight=4)
    with pytest.raises(tgems.TGEMError, match="audit rate"):
        DepthScheduler(bb, audit_rate=1.5)
    with pytest.raises(tgems.TGEMError, match="4-D"):
        DepthScheduler(bb).submit(torch.zeros(3, 32, 32), emb[2]["a"].policy(), lambda i, r: None)


def test_every_layer_runs_full_batches_while_images_wait(emb):
    """Under saturation (images waiting to enter) every step is a full batch, at every depth, while rows exit."""
    bb, px, clfs = emb
    a = clfs["a"]
    many = torch.cat([px, px, px])
    ref = a.predict(many)
    sched = DepthScheduler(bb, max_batch_size=4, max_inflight=4 * bb.num_layers)
    got = predict_rows(sched, [(many, a.policy())])[0]
    _check_same(got, ref, a)
    sat = sched.occupancy(saturated=True)
    ran = [o for o in sat if o is not None]
    assert len(ran) >= 8 and all(o == 1.0 for o in ran)
    assert len(set(ref.exit_layers.tolist())) > 3  # rows did leave at several depths meanwhile


def test_flops_are_the_engines_with_a_shortlisted_label_set(monkeypatch):
    """Above SHORTLIST_ABOVE labels the layers between full scorings score only a shortlist, so the exit head
    costs differ by layer: a row's FLOPs are still the engine's one count (`exit_flops`)."""
    from tgems import profiles as P

    monkeypatch.setattr(P, "SHORTLIST_ABOVE", 32)
    monkeypatch.setattr(P, "SHORTLIST_SIZE", 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = tgems.load_backbone("embedded")
        ds = tgems.load_dataset("scenes:test:40")
        clf = tgems.EarlyExitClassifier(bb, "embedded:cls", ds.classes)
    assert clf.profiles.shortlist == 8 and len(clf.labels) > 32
    px = bb.preprocess(list(ds.images))
    ref = clf.predict(px)
    got = predict_rows(DepthScheduler(bb, max_batch_size=8), [(px, clf.policy())])[0]
    _check_same(got, ref, clf)
    assert len(set(ref.exit_layers.tolist())) > 2
