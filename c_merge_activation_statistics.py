"""
Sum the shards of one corpus-mode stage-b run (b_generate_activation_dataset.py --input_text ... --shard I/N)
into one dataset directory: {m}_neuron_frequency.csv, the compact graph store {m}_weighted_graph/,
{m}_corpus.json and the graph files, as the unsharded run would have written them (counts bit for bit,
mean_activation to float64 rounding; with --attribution and --direct_edges, those means combined weighted by each
shard's tokens and samples, to float64 rounding when the shards' batches match).

Refuses shards of another model (its weights' sha256), context, corpus or shard count, shards of which some ran
with --attribution or --direct_edges (or another --edges) and some without, a missing or repeated shard, a shard whose run has not finished, a shard whose files (its graph store's included) differ from what its
manifest lists or whose store's node counts differ from its frequency file, and an --output_dir that is, lies
inside or holds a shard directory. Works with shards made anywhere (e.g. one Slurm array task per shard).

    python c_merge_activation_statistics.py --output_dir corpus_gpt2 shard_0 shard_1 shard_2 shard_3
"""

from gelutrace.cli import parser, run_main
from gelutrace.record.shards import merge_shards


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("--output_dir", required=True, help="dataset directory for the merged files (created if missing)")
    ap.add_argument("shard_dirs", nargs="+", metavar="SHARD_DIR",
                    help="the export directories of every shard I/N of one run, in any order")
    args = ap.parse_args(argv)
    record = merge_shards(args.shard_dirs, args.output_dir)
    print(f"{len(args.shard_dirs)} shards, {record['samples']:,} samples merged into {args.output_dir}")


if __name__ == "__main__":
    run_main(main)
