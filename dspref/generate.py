"""Generate-during-eval: what the model writes (or, for a reward model, how it scores) at each eval.

A fixed sample of eval rows, drawn once from the seed, is shared out over the ranks; each rank
generates for its share and every rank ends with the whole table (rank 0 writes it). Sampling
uses its own seeded random stream (from seed, step and rank) inside ``torch.random.fork_rng``, so turning
generation on changes nothing in training: the same losses, step for step.

- causal LMs (BCO, CPO, KTO): a completion from the policy and, where the run holds a reference
  model, from the reference (see :func:`dspref.engine.generation_model` for ZeRO-3);
- reward models: the sampled eval pairs with the model's score of each side (TRL's reward
  trainer shows the same table).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dspref import engine as eng



@dataclass(frozen=True)
class GenerationSettings:
    num_prompts: int
    max_new_tokens: int
    temperature: float
    top_p: float
    gather: bool  # ZeRO-3: gather the whole model once (ds3_gather_for_generation)
    seed: int

    @classmethod
    def from_config(cls, cfg) -> "GenerationSettings":
        return cls(num_prompts=cfg.generation_num_prompts, max_new_tokens=cfg.generation_max_new_tokens,
                   temperature=cfg.generation_temperature, top_p=cfg.generation_top_p,
                   gather=cfg.ds3_gather_for_generation, seed=cfg.seed)


def sample_rows(n_rows: int, k: int, seed: int) -> list[int]:
    """``k`` eval row indices drawn once from ``seed`` (the same on every rank and at every eval)."""
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n_rows, generator=g)[:k].tolist())


def share(n: int, rank: int, world: int) -> tuple[list[int], bool]:
    """Positions ``0..n-1`` this rank handles, and whether they are real.

    A rank with nothing to do gets position 0 as a filler (its result dropped): under ZeRO-3 every
    rank must join each forward.
    """
    mine = list(range(rank, n, world))
    return (mine, True) if mine else ([0], False)


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every rank's rows, on every rank, ordered by their ``position``."""
    world = torch.distributed.get_world_size()
    parts = [None] * world
    torch.distributed.all_gather_object(parts, rows)
    rows = sorted((row for part in parts for row in part), key=lambda row: row["position"])
    return [{k: v for k, v in row.items() if k != "position"} for row in rows]


class CompletionSampler:
    """Generates completions for the sampled eval prompts from the policy and the reference."""

    def __init__(self, engine, reference, dataset, tokenizer, settings: GenerationSettings):
        self.engine = engine
        self.reference = reference
        self.tokenizer = tokenizer
        self.settings = settings
        self.rows = sample_rows(len(dataset), settings.num_prompts, settings.seed)
        self.prompts = [list(dataset[i]["prompt_ids"]) for i in self.rows]

    def __call__(self, step: int) -> list[dict]:
        positions, real = share(len(self.prompts), torch.distributed.get_rank(), torch.distributed.get_world_size())
        prompts = [self.prompts[i] for i in positions]
        # The same stream at every eval for a given (seed, step, rank): reruns reproduce the table.
        seed = hash((self.settings.seed, step, torch.distributed.get_rank())) % 2**63
        columns = {"policy": self._generate(eng.generation_model(self.engine, gather=self.settings.gather),
                                            prompts, seed)}
        reference_model = getattr(self.reference, "generation_model", None)
        if reference_model is not None:
            columns["reference"] = self._generate(reference_model(gather=self.settings.gather), prompts, seed)
        decode = self._decode
        local = [{"position": p, "row": self.rows[p], "prompt": decode(prompt),
                  **{name: decode(ids[k]) for name, ids in columns.items()}}
                 for k, (p, prompt) in enumerate(zip(positions, prompts))] if real else []
        return gather_rows(local)

    def _generate(self, model_context, prompts: list[list[int]], seed: int) -> list[list[int]]:
        """New tokens for each prompt (up to the first EOS), prompts left-padded into one batch."""
        tok, s = self.tokenizer, self.settings
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)  # (B, P)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, P)
        for i, p in enumerate(prompts):
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[i, width - len(p):] = 1
        sampling = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": 0} \
            if s.temperature > 0 else {"do_sample": False}
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with model_context as (model, synced), torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            dev = eng.device()
            out = model.generate(input_ids=input_ids.to(dev), attention_mask=attention_mask.to(dev),
                                 max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id, synced_gpus=synced, use_cache=True, **sampling)
        completions = []
        for row in out[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            completions.append(row)
        return completions

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class PairScorer:
    """Reward modeling: the sampled eval pairs and the model's score of each side."""

    def __init__(self, engine, dataset, collate, tokenizer, settings: GenerationSettings):
        self.engine = engine
        self.collate = collate
        self.tokenizer = tokenizer
        self.rows = sample_rows(len(dataset), settings.num_prompts, settings.seed)
        self.pairs = [dataset[i] for i in self.rows]

    def __call__(self, step: int) -> list[dict]:
        positions, real = share(len(self.pairs), torch.distributed.get_rank(), torch.distributed.get_world_size())
        pairs = [self.pairs[i] for i in positions]
        batch = self.collate(pairs)
        with eng.eval_mode(self.engine):
            rewards = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])["rewards"]
        chosen, rejected = rewards.float().cpu().chunk(2)
        local = []
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        for k, (p, pair) in enumerate(zip(positions, pairs)):
            a, b = list(pair["chosen_ids"]), list(pair["rejected_ids"])
            n = _common_prefix(a, b)  # the implicit prompt
            local.append({"position": p, "row": self.rows[p], "prompt": decode(a[:n]), "chosen": decode(a[n:]),
                          "rejected": decode(b[n:]), "score_chosen": chosen[k].item(),
                          "score_rejected": rejected[k].item()})
        return gather_rows(local if real else [])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def make_sampler(cfg, objective, engine, eval_ds, collate, tokenizer):
    """The generate-during-eval callable for this run (``step -> rows``), or ``None`` when it is off."""
    if not cfg.generate_during_eval or eval_ds is None:
        return None
    settings = GenerationSettings.from_config(cfg)
    if objective.model_kind == "sequence-classification":
        return PairScorer(engine, eval_ds, collate, tokenizer, settings)
    return CompletionSampler(engine, getattr(objective, "reference", None), eval_ds, tokenizer, settings)
