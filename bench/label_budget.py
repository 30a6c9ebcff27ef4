"""Few-shot accuracy against the labelling budget on CIFAR-10: the items `Suggest` picks against items
picked uniformly at random, with the same encoder, pool and queries, in one run.

A real server serves the encoder (--model, default the committed pretrained encoder) and stores a
pool of CIFAR-10 training images without labels. For each seed, labels are given in rounds of 10
(the labeller is an oracle: the folder names) up to each budget of --budgets:
  * suggest:         the next 10 are the server's Suggest(n=10, seed) given the labels so far;
  * suggest-early-uncertain: the same with uncertain_from=0 (half of each round after the first
                     goes to the least decided votes), the ablation behind Suggest's default;
  * random:          the next 10 are drawn uniformly from the unlabelled pool (seeded);
  * oracle-typical:  a reference that no labeller has: knowing every pool item's class, the budget/10
                     most typical items of each class (1 / mean distance to their 20 nearest
                     same-class items), a bound on what choosing can do for this encoder.
After each budget, the held-out test images are classified by the InstDisc vote among the labelled
items (k=200, τ=0.07, the server's Classify defaults; the vote runs here on the embeddings the server
returns, with the shared moco_retrieval.knn: the same predictions as Classify, without 10,000 calls).
The JSON holds every seed's accuracy; the plot shows their mean and range.

    BVENV=$(scripts/ensure_bench_venv.sh)
    $BVENV/bin/python bench/label_budget.py
"""

from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moco_retrieval.knn import knn_classify, topk_accuracy
from retrieval_client import RetrievalClient, UpsertItem
from retrieval_server.process import ServerProcess
from retrieval_server.suggest import typicality

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar import (  # noqa: E402
    cifar_parser,
    class_subset,
    ensure_cifar,
    pretrained_export,
    save_figure,
    write_report,
)
from common import machine_info  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ROUND = 10
STRATEGIES = {"suggest": None, "suggest-early-uncertain": 0, "random": None}  # -> Suggest's uncertain_from
K, TAU = 200, 0.07


def files(root: Path) -> list[tuple[str, Path, str]]:
    """(id, path, class) of a labelled folder, sorted."""
    return [
        (f"{d.name}/{f.name}", f, d.name) for d in sorted(root.iterdir()) if d.is_dir() for f in sorted(d.iterdir())
    ]


def accuracy(
    pool_vectors: dict[str, np.ndarray],
    truth: dict[str, str],
    labelled: list[str],
    queries: np.ndarray,
    query_classes: list[str],
) -> float:
    classes = sorted({truth[i] for i in labelled})
    bank = torch.from_numpy(np.stack([pool_vectors[i] for i in labelled]))
    bank_labels = torch.tensor([classes.index(truth[i]) for i in labelled])
    shares = knn_classify(torch.from_numpy(queries), bank, bank_labels, len(classes), k=K, tau=TAU)
    targets = torch.tensor([classes.index(c) if c in classes else -1 for c in query_classes])
    return topk_accuracy(shares, targets, ks=(1,))["top1"]


def run_strategy(
    client: RetrievalClient,
    strategy: str,
    seed: int,
    budgets: list[int],
    pool_ids: list[str],
    truth: dict[str, str],
    pool_vectors: dict,
    queries: np.ndarray,
    query_classes: list[str],
) -> dict:
    client.set_labels({i: "" for i in pool_ids})  # start from no label
    rng = random.Random(seed)
    labelled: list[str] = []
    out = {}
    for budget in budgets:
        while len(labelled) < budget:
            n = min(ROUND, budget - len(labelled))
            if strategy.startswith("suggest"):
                chosen = [s.id for s in client.suggest(n, seed=seed, uncertain_from=STRATEGIES[strategy])]
            else:
                chosen = rng.sample(sorted(set(pool_ids) - set(labelled)), n)
            client.set_labels({i: truth[i] for i in chosen})
            labelled += chosen
        out[budget] = {
            "top1": round(accuracy(pool_vectors, truth, labelled, queries, query_classes), 2),
            "classes_covered": len({truth[i] for i in labelled}),
        }
        print(f"  {strategy:23} seed {seed} {budget:4} labels: {out[budget]}", flush=True)
    return out


def oracle_typical(
    budgets: list[int],
    pool_vectors: dict[str, np.ndarray],
    truth: dict[str, str],
    queries: np.ndarray,
    query_classes: list[str],
) -> dict:
    """Accuracy when each class's most typical items are labelled, budget / classes of each
    (typicality as Suggest measures it within a cluster, here within a class)."""
    classes = sorted(set(truth.values()))
    ids = sorted(truth)
    of_class = np.array([classes.index(truth[i]) for i in ids])
    typical = typicality(np.stack([pool_vectors[i] for i in ids]), of_class, len(classes), seed=0)
    order = np.argsort(-typical, kind="stable")  # most typical first
    ranked = {c: [ids[j] for j in order if of_class[j] == n] for n, c in enumerate(classes)}
    out = {}
    for budget in budgets:
        labelled = [i for c in classes for i in ranked[c][: budget // len(classes)]]
        out[budget] = {
            "top1": round(accuracy(pool_vectors, truth, labelled, queries, query_classes), 2),
            "classes_covered": len({truth[i] for i in labelled}),
        }
        print(f"  {'oracle-typical':23}        {budget:4} labels: {out[budget]}", flush=True)
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    budgets = report["setup"]["budgets"]
    colors = {"suggest": "tab:blue", "suggest-early-uncertain": "tab:orange", "random": "tab:gray"}
    for strategy, color in colors.items():
        runs = report["results"][strategy]
        acc = np.array([[run[str(b)]["top1"] for b in budgets] for run in runs.values()])
        ax.plot(budgets, acc.mean(0), "o-", color=color, label=f"{strategy} (mean of {len(runs)} seeds)")
        ax.fill_between(budgets, acc.min(0), acc.max(0), color=color, alpha=0.15)
    oracle = report["results"]["oracle-typical"]
    ax.plot(budgets, [oracle[str(b)]["top1"] for b in budgets], "k--", label="oracle-typical (knows the classes)")
    ax.set_xscale("log")
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("labelled images (CIFAR-10, 10 classes)")
    ax.set_ylabel("kNN top-1 % on held-out images")
    ax.set_title("Which images to label: Suggest vs random", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    save_figure(fig, path)


def main() -> None:
    parser = cifar_parser(__doc__, "label_budget")
    parser.add_argument("--model", type=Path, default=None, help="export to serve (default: the pretrained encoder)")
    parser.add_argument("--pool-per-class", type=int, default=500, help="unlabelled pool: training images per class")
    parser.add_argument("--queries-per-class", type=int, default=200, help="held-out test images per class")
    parser.add_argument("--budgets", type=int, nargs="*", default=[10, 20, 50, 100])
    parser.add_argument("--seeds", type=int, default=10, help="seeds per strategy (one seed varies by 2-4 points)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "label_budget.json")
    args = parser.parse_args()
    ensure_cifar(args.cifar)
    model = args.model or pretrained_export(args.work / "pretrained_export.pt")
    pool_dir = class_subset(args.cifar / "train", args.pool_per_class, args.work / "pool")
    query_dir = class_subset(args.cifar / "test", args.queries_per_class, args.work / "queries")
    pool, query = files(pool_dir), files(query_dir)
    truth = {i: c for i, _, c in pool}
    start = time.time()
    with ServerProcess(model, args.work / "store", "--reset-store", cwd=REPO, log_dir=args.work) as server:
        with RetrievalClient(server.address, timeout=600) as client:
            client.upsert_many(UpsertItem(i, image=p.read_bytes()) for i, p, _ in pool)
            stored = client.get([i for i, _, _ in pool], include_embedding=True)
            pool_vectors = {s.id: s.embedding for s in stored}
            queries = client.embed([p.read_bytes() for _, p, _ in query])
            results = {
                strategy: {
                    seed: run_strategy(
                        client,
                        strategy,
                        seed,
                        args.budgets,
                        list(truth),
                        truth,
                        pool_vectors,
                        queries,
                        [c for _, _, c in query],
                    )
                    for seed in range(args.seeds)
                }
                for strategy in STRATEGIES
            }
            oracle = oracle_typical(args.budgets, pool_vectors, truth, queries, [c for _, _, c in query])
            info = client.info()
    summary = {
        str(b): {s: round(float(np.mean([run[b]["top1"] for run in results[s].values()])), 2) for s in STRATEGIES}
        for b in args.budgets
    }
    for b, row in summary.items():
        row["gain_points"] = round(row["suggest"] - row["random"], 2)
        row["oracle-typical"] = oracle[int(b)]["top1"]
    report = {
        "benchmark": "label_budget",
        "setup": {
            "model": str(model.relative_to(REPO) if model.is_relative_to(REPO) else model),
            "fingerprint": info.model_fingerprint,
            "arch": info.arch,
            "pool": len(pool),
            "queries": len(query),
            "budgets": args.budgets,
            "round": ROUND,
            "seeds": args.seeds,
            "k": K,
            "tau": TAU,
        },
        "results": {
            s: {str(seed): {str(b): v for b, v in run.items()} for seed, run in r.items()} for s, r in results.items()
        }
        | {"oracle-typical": {str(b): v for b, v in oracle.items()}},
        "mean_top1": summary,
        "machine": machine_info(),
        "wall_s": round(time.time() - start, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    write_report(report, args.out, plot)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
