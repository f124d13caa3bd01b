"""``fbnprune export RUN_DIR``: a publishable folder, optionally pushed to the Hugging Face Hub."""

from __future__ import annotations

import argparse
from pathlib import Path

from fbnprune.rundir.layout import EXPORT_PREFIX, checkpoint_name

EPILOG = f"""\
examples:
  fbnprune export runs/demo                          # runs/demo/{EXPORT_PREFIX}padded/
  fbnprune export runs/demo --layout compact --quantize int8 --onnx
  fbnprune export runs/demo --push-to-hub me/smollm2-bbc-pruned --dry-run
  HF_TOKEN=... fbnprune export runs/demo --push-to-hub me/smollm2-bbc-pruned --private

The token comes from HF_TOKEN or `hf auth login`, the endpoint from HF_ENDPOINT; the token is
never written or printed. An export whose inputs and options did not change is reused, so a
failed upload is retried by running the same command again; files the Hub already holds
unchanged are not sent again.
"""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a publishable folder (weights, card, plan, reports); optionally push it",
        description="Export a run's checkpoint as a folder ready to publish: safetensors "
        "weights, config, tokenizer, generation config, recipe, plan, parity report, "
        "evaluation results if any, and a model card (README.md). Optionally add an int8 "
        "(optimum-quanto) or ONNX copy, and upload the folder to the Hugging Face Hub.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir", type=Path, metavar="RUN_DIR", help="a run directory written by `fbnprune run`"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"folder to write (default: RUN_DIR/{EXPORT_PREFIX}LAYOUT[-healed])",
    )
    parser.add_argument(
        "--layout",
        choices=("padded", "compact"),
        default=None,
        help="which checkpoint to export (default: padded if the run saved "
        "it, else compact); compact needs trust_remote_code=True",
    )
    parser.add_argument(
        "--healed",
        action="store_true",
        help="export the heal stage's distilled checkpoint "
        f"({checkpoint_name('LAYOUT', healed=True)}/) instead of the "
        "unhealed slice",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        default=None,
        help="also write int8/: optimum-quanto weight-only int8, with its size "
        "and logit/perplexity change (needs fbnprune[quantize])",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write onnx/model.onnx (torch.onnx dynamo export, checked in "
        "onnxruntime; needs fbnprune[onnx])",
    )
    parser.add_argument(
        "--max-shard-size",
        default="5GB",
        metavar="SIZE",
        help="largest safetensors file, e.g. 5GB or 500MB (default: 5GB)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild even if --out is up to date (an existing --out is only "
        "ever replaced when it is an fbnprune export or empty)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="export even a model the run's verdict flagged (one answer for more than 90%% "
        "of the documents, or below the majority label's rate; see RUN_DIR/verdict/)",
    )
    hub = parser.add_argument_group("Hugging Face Hub")
    hub.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="upload the folder to this model repository (namespace/name), creating it if needed",
    )
    hub.add_argument(
        "--private",
        action="store_true",
        help="create the repository private (an existing one keeps its visibility)",
    )
    hub.add_argument(
        "--revision",
        metavar="BRANCH",
        default=None,
        help="upload to this branch, created if missing (default: main)",
    )
    hub.add_argument(
        "--commit-message",
        metavar="MSG",
        default=None,
        help="commit title (default: 'Upload pruned model (fbnprune)')",
    )
    hub.add_argument(
        "--dry-run",
        action="store_true",
        help="write the folder but only list what would be uploaded and its size",
    )
    parser.set_defaults(execute=execute, parser=parser)


def execute(args: argparse.Namespace) -> int:
    from fbnprune.publish.folder import export_run

    hub_only = [
        flag
        for flag, value in (
            ("--private", args.private),
            ("--revision", args.revision),
            ("--commit-message", args.commit_message),
            ("--dry-run", args.dry_run),
        )
        if value
    ]
    if hub_only and not args.push_to_hub:
        args.parser.error(f"{', '.join(hub_only)} only make(s) sense with --push-to-hub REPO_ID")
    if args.push_to_hub:  # a bad id is refused before the export folder is written
        from fbnprune.publish.hub import check_repo_id

        check_repo_id(args.push_to_hub)
    result = export_run(
        args.run_dir,
        args.out,
        layout=args.layout,
        healed=args.healed,
        quantize=args.quantize,
        onnx=args.onnx,
        overwrite=args.overwrite,
        max_shard_size=args.max_shard_size,
        repo_id=args.push_to_hub,
        force=args.force,
    )
    print(result.summary())
    if args.push_to_hub:
        from fbnprune.publish.hub import push_folder

        pushed = push_folder(
            result.out_dir,
            args.push_to_hub,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
        )
        print(pushed.summary())
    return 0
