"""``tinylm <command>``: parse arguments, call one function. No logic lives here.

    tinylm quickstart --out runs/quickstart
    tinylm tokenizer train --data a.txt b.jsonl --vocab-size 6400 --out runs/tok
    tinylm pretrain --config configs/cpu-tiny.yaml --out runs/tiny [--resume] [--train.max_steps=200 ...]
    tinylm sft --init runs/tiny/final --data chats.jsonl --out runs/chat [--template chatml] [--lora | --qlora]
    tinylm dpo --init runs/chat/final --data pairs.jsonl --out runs/dpo [--loss sigmoid|orpo|simpo] [--lora]
    tinylm rm --init runs/chat/final --data pairs.jsonl --out runs/rm [--lora | --qlora]
    tinylm grpo --init runs/chat/final --reward arithmetic --out runs/grpo [--data prompts.jsonl] [--lora]
    tinylm distill --teacher runs/big/final --student cpu-tiny --out runs/student [--data a.txt] [--chat]
    tinylm vlm quickstart --out runs/vlm
    tinylm vlm pretrain --init runs/chat/final --out runs/vlm1 [--vision SIGLIP_DIR]
                        [--data captions.jsonl | --coco captions.json]
    tinylm vlm sft --init runs/vlm1/final --out runs/vlm2 [--data conversations.jsonl] [--lora]
    tinylm generate runs/tiny/final --prompt "Once upon a time" --max-new-tokens 64
    tinylm chat runs/tiny/final [--system TEXT] [--image PATH]
    tinylm merge runs/tiny/final runs/adapter runs/merged
    tinylm plot runs/tiny
    tinylm report runs/quickstart
    tinylm tokenizer encode runs/tiny/final "Hello, 世界"
    tinylm configs [list | show cpu-tiny | copy cpu-tiny my.yaml]

Wherever a model directory goes, a Hugging Face Hub id goes too: ``tinylm chat Qwen/Qwen2.5-0.5B-Instruct``,
``--init org/name``, and ``--revision REV`` for a branch, tag or commit of the command's model.

Errors in what the user handed us (a config key, a data file, a model directory) print one line naming
the culprit, not a traceback; set TINYLM_DEBUG=1 to see the traceback anyway.

A command imports its modules only when it runs, so ``tinylm --help`` answers without loading torch.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import sys
from pathlib import Path

from tinylm.cli.args import build_parser
from tinylm.cli.parsing import pin_revision, resolve_config_path, sampling_settings, torch_dtype
from tinylm.cli.tools import configs_tool, tokenizer_tool
from tinylm.cli.training_args import STAGES, TRAINING_COMMANDS, flag_overrides, is_model, split_overrides

__all__ = ["build_parser", "main", "resolve_config_path", "run"]


def run_rag(args, overrides: list[str]) -> int:
    if args.rag_command == "quickstart":
        from tinylm.rag_quickstart import rag_quickstart

        device = [f"--train.device={args.device}"] if args.device else []
        first, overrides = split_overrides(overrides, "quickstart")  # for the quickstart run without --init
        overrides, first = [*overrides, *device], [*first, *device]
        rag_quickstart(args.out, args.init, overrides=overrides, quickstart_overrides=first, questions=args.questions)
        return 0
    from tinylm.rag.embed import Embedder

    embedder = Embedder(args.embedder, query_prefix=args.query_prefix) if args.embedder else None
    if args.rag_command == "index":
        from tinylm.rag.index import build_index

        report = build_index(args.paths, args.out, embedder, args.chunk_size, args.chunk_overlap)
        print(report.summary(), file=sys.stderr)
        print(f"wrote {args.out}", file=sys.stderr)
        return 0
    from tinylm.rag.search import Searcher

    searcher = Searcher(args.index, embedder)
    if args.rag_command == "search":
        for rank, hit in enumerate(searcher.search(args.query, args.k), 1):
            if args.json:
                fields = {"source": hit.source, "score": hit.score, "text": hit.text, "part": hit.part}
                print(json.dumps(fields | {"start": hit.start}, ensure_ascii=False))
            else:
                print(f"[{rank}] {hit.where()} (score {hit.score:.3f})\n    {hit.text}\n")
        return 0
    from tinylm.infer.engine import Engine
    from tinylm.rag.ask import Asker, sources

    engine = Engine.from_dir(
        args.model, device=args.device, dtype=torch_dtype(args.dtype), compile=args.compile, kv_cache=args.kv_cache
    )
    asker = Asker(engine, searcher, args.k, sampling_settings(args, engine), args.prompt_template, args.system)
    reply, used = asker.answer(args.question)
    print(reply)
    print("\nSources:\n" + (sources(used) or "(none retrieved)"))
    return 0


def run(args, overrides: list[str]) -> int:
    reading = args.command == "rag" and args.rag_command == "quickstart"  # its overrides go to a fine-tune
    if overrides and args.command not in TRAINING_COMMANDS and not reading:
        raise ValueError(f"unrecognized arguments: {' '.join(overrides)}")
    pin_revision(args)
    overrides = [*overrides, *flag_overrides(args)]

    if args.command == "quickstart":
        from tinylm.quickstart import quickstart

        sft_overrides, overrides = split_overrides(overrides, "sft")
        quickstart(args.out, resolve_config_path(args.config), overrides, sft_overrides=sft_overrides)
    elif args.command == "vlm" and args.vlm_command == "quickstart":
        from tinylm.vlm_quickstart import vlm_quickstart

        llm_overrides, overrides = split_overrides(overrides, "llm")
        vlm_quickstart(args.out, llm=args.llm, device=args.device, overrides=overrides, llm_overrides=llm_overrides)
    elif args.command == "vlm":
        from tinylm.config import load_config
        from tinylm.train.vlm import VLMStageConfig, train_vlm

        cfg = load_config(VLMStageConfig, resolve_config_path(args.config), overrides)
        _, result = train_vlm(cfg, args.out, args.vlm_command, resume=args.resume)
        if result.interrupted:
            return 130
    elif args.command == "tokenizer" and args.tokenizer_command in ("encode", "decode"):
        tokenizer_tool(args)
    elif args.command == "configs":
        configs_tool(args)
    elif args.command == "tokenizer":
        from tinylm.data.text import train_tokenizer_from_files
        from tinylm.tokenizer import train_tokenizer

        if args.data:
            tokenizer = train_tokenizer_from_files(
                args.data, args.vocab_size, text_field=args.text_field, txt_split=args.txt_split
            )
        else:
            from tinylm.data import builtin

            tokenizer = train_tokenizer(builtin.pretrain_documents(builtin.World(0)), args.vocab_size)
        tokenizer.save(args.out)
        print(f"saved a {tokenizer.vocab_size}-token tokenizer to {args.out}", file=sys.stderr)
    elif args.command in STAGES:
        from tinylm.config import load_config

        class_name, module, function = STAGES[args.command]
        stage = importlib.import_module(module)  # the stage's module holds its config class and its recipe
        # a distillation student given as a config brings its own data and training settings
        name = args.student if args.command == "distill" and not is_model(args.student) else args.config
        if args.command == "pretrain":
            name, overrides = name or "cpu-tiny", [*pretrain_defaults(args, overrides), *overrides]
        cfg = load_config(getattr(stage, class_name), resolve_config_path(name), overrides)
        _, result = getattr(stage, function)(cfg, args.out, resume=args.resume)
        if result.interrupted:
            return 130
    elif args.command == "generate":
        from tinylm.infer.engine import Engine

        engine = Engine.from_dir(
            args.model_dir,
            device=args.device,
            dtype=torch_dtype(args.dtype),
            compile=args.compile,
            kv_cache=args.kv_cache,
        )
        for piece in engine.stream(args.prompt, sampling_settings(args, engine), images=args.image):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    elif args.command == "chat":
        from tinylm.infer.chat import answer_prompts, chat_format_for, read_prompts, run_chat
        from tinylm.infer.engine import Engine
        from tinylm.io import atomic_write_text

        engine = Engine.from_dir(
            args.model_dir,
            device=args.device,
            dtype=torch_dtype(args.dtype),
            compile=args.compile,
            kv_cache=args.kv_cache,
        )
        chat_format = chat_format_for(engine.tokenizer, engine.model.config.eos_token_ids())
        augment = None
        if args.rag:
            from tinylm.rag.ask import Asker, sources
            from tinylm.rag.search import Searcher

            asker = Asker(engine, Searcher(args.rag), args.rag_k, sampling_settings(args, engine), system=args.system)

            def augment(question: str) -> tuple[str, str]:
                turn, used = asker.turn(question)
                return turn, "Sources:\n" + (sources(used) or "(none retrieved)")

        if args.prompts:
            records = answer_prompts(
                engine,
                read_prompts(args.prompts),
                args.system,
                sampling_settings(args, engine),
                chat_format,
                images=args.image,
                augment=augment,
            )
            lines = [json.dumps(r, ensure_ascii=False) for r in records]
            if args.output:
                atomic_write_text(args.output, "".join(line + "\n" for line in lines))
                print(f"wrote {len(lines)} answers to {args.output}", file=sys.stderr)
            else:
                for record in records:
                    print(f"> {record['prompt']}\n{record['answer']}\n")
        else:
            run_chat(
                engine,
                system=args.system,
                settings=sampling_settings(args, engine),
                chat_format=chat_format,
                images=args.image,
                augment=augment,
            )
    elif args.command == "serve":
        from tinylm.serve.app import build_server, serve

        server = build_server(
            args.model_dir,
            name=args.name,
            device=args.device,
            dtype=torch_dtype(args.dtype),
            compile=args.compile,
            kv_cache=args.kv_cache,
            max_batch=args.max_batch,
            max_len=args.max_len,
            max_waiting=args.max_waiting,
            api_key=args.api_key,
            max_body=int(args.max_body_mb * 2**20),
            thread=False,
            rag=args.rag,
            rag_k=args.rag_k,
            embedder=args.embedder,
            query_prefix=args.query_prefix,
        )
        serve(server, args.host, args.port, args.log_level)
    elif args.command == "merge":
        from tinylm.modeldir import merge_adapter_dir

        config = merge_adapter_dir(args.adapter_dir, args.out_dir, args.model_dir)
        print(
            f"merged a rank-{config.r} adapter over {len(config.target_modules)} kinds of layer into {args.out_dir}",
            file=sys.stderr,
        )
    elif args.command == "export":
        from tinylm.export.gguf import export_gguf

        written = export_gguf(args.model_dir, args.out, args.type)
        for path in written:
            print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB)")
    elif args.command == "quantize":
        from tinylm.export.quantize import Calibration, quantize_model_dir

        size = args.group_size or (32 if args.bits == 4 else "channel")
        calibration = Calibration(args.calib, args.calib_samples, args.calib_seq_len)
        out = quantize_model_dir(
            args.model_dir, args.out, args.bits, None if size == "channel" else size, args.method, calibration
        )
        print(
            f"wrote {out} ({sum(f.stat().st_size for f in out.glob('*.safetensors')) / 2**20:.2f} MiB of weights)",
            file=sys.stderr,
        )
    elif args.command == "eval":
        from tinylm.eval.harness import evaluate
        from tinylm.infer.engine import Engine

        engine = Engine.from_dir(
            args.model_dir, device=args.device, dtype=torch_dtype(args.dtype), kv_cache=args.kv_cache
        )
        results = evaluate(
            engine,
            args.tasks,
            data_dir=args.data_dir,
            shots=args.shots,
            limit=args.limit,
            batch_size=args.batch_size,
            chat=args.chat,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            out=args.out,
            model_name=str(args.model_dir),
        )
        from tinylm.eval.harness import markdown

        print(markdown(results))
        if args.card:
            from tinylm.modelcard import add_evaluation

            source = f"tinylm eval --tasks {args.tasks}" + (f" --shots {args.shots}" if args.shots is not None else "")
            if not add_evaluation(args.model_dir, results["tasks"], source):
                print(f"{args.model_dir} has no README.md model card to add the results to", file=sys.stderr)
    elif args.command == "rag":
        return run_rag(args, overrides)
    elif args.command == "plot":
        from tinylm.train.metrics import plot_losses

        run_dir = Path(args.run_dir)
        if plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png") is None:
            raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'}: no logged losses to plot")
        print(run_dir / "loss.png")
    elif args.command == "report":
        from tinylm.eval.report import write_report

        for path in write_report(args.run_dir, args.out):
            print(path)
    return 0


def pretrain_defaults(args, overrides: list[str]) -> list[str]:
    """With --minutes: keep the best evaluation; and, given --data and no config (nor --init), a model,
    vocabulary and schedule sized to the text and the budget (printed, each one overridable)."""
    if not args.minutes:
        return []
    if args.config is not None or args.init or not args.data:
        return ["--train.keep_best=true"]
    from tinylm.config import load_config
    from tinylm.train.pretrain import PretrainConfig
    from tinylm.train.sizing import explain, size_run

    given = load_config(PretrainConfig, resolve_config_path("cpu-tiny"), overrides)  # the data settings asked for
    sizing = size_run(given.data.files, args.minutes, given.train.device, given.data.text_field, given.data.txt_split)
    explain(sizing)
    return sizing.overrides


def out_of_memory(error: BaseException) -> bool:
    text = str(error).lower()
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in text or "can't allocate memory" in text


OUT_OF_MEMORY = (
    "out of memory: lower train.batch_size (and raise train.grad_accum to keep the same tokens per step), "
    "train.seq_len or the model's size; for inference, lower --max-batch / --max-len or use --dtype bfloat16"
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, overrides = parser.parse_known_args(argv)
    try:
        return run(args, overrides)
    except KeyboardInterrupt:  # outside training (which saves and returns 130 itself)
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (`tinylm generate ... | head`): not an error
        sys.stderr.close()
        return 0
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
        if os.environ.get("TINYLM_DEBUG"):
            raise
        if isinstance(e, RuntimeError) and not out_of_memory(e):
            raise  # a bug, not the user's input: the traceback is what helps
        print(f"error: {OUT_OF_MEMORY} ({e})" if out_of_memory(e) else f"error: {e}", file=sys.stderr)
        return 2
