"""``bench methods``: every registered method, what it trains and how many parameters that is."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("methods", help="list the fine-tuning methods and their trainable parameters",
                       description="For every registered method (default hyper-parameters): what it trains, "
                                   "the trainable parameter count after its set-up and the share of the "
                                   "foundation network's parameters.")
    p.add_argument("--foundation", default=None, metavar="NAME|PATH",
                   help="a suite recipe's name (phantom-stunet-v1) or an nnU-Net trained-model folder; "
                        "default: the phantom foundation's architecture")
    p.set_defaults(func=main)


def network_factory(foundation=None):
    """A callable building a fresh network of the foundation's architecture (weights do not matter here)."""
    from bench.engine.network import ONE_LABEL_DATASET_JSON, build_network, tiny_plans
    if foundation is None:
        plans, dataset_json, configuration = tiny_plans("Dataset902_PhantomTarget"), ONE_LABEL_DATASET_JSON, "3d_fullres"
    else:
        from bench.foundation import get_foundation
        f = get_foundation(foundation)
        plans, dataset_json, configuration = f.plans, f.dataset_json, f.configuration
    return lambda: build_network(plans, dataset_json, configuration)


def main(args) -> int:
    from bench.methods.inventory import format_table, method_table
    rows = method_table(network_factory(args.foundation))
    print(f"{rows[0]['total']:,} parameters in the foundation network "
          f"({args.foundation or 'phantom foundation architecture'})\n")
    print(format_table(rows))
    return 0
