"""Look inside attention: which earlier tokens does each token look at? (course stage 1)

The course opens with a sentence and a question: in "A cachorra correu atrás da bola, mas ela era
muito rápida.", which earlier word must the model look at to understand "ela"? A trained model
answers with its attention weights. This module runs the model's explicit attention path
(`GPTModel.forward(..., return_attention=True)`, the step-by-step softmax(q k^T / sqrt(hs)) of
`dozero.model.gpt.explicit_attention`), draws the weights as heatmaps, and ranks the earlier
tokens a chosen token attends to.

    dozero attention --model runs/shakespeare-char "A cachorra correu atrás da bola, mas ela era muito rápida." \\
        --token ela --out attention.png

    >>> from dozero.course.attention import compute_attention
    >>> result = compute_attention(model, tokenizer, "To be or not to be")   # doctest: +SKIP
    >>> result.weights.shape        # (n_layers, nh, T, T); every row sums to 1, zero above the diagonal

Shape legend: L n_layers, nh n_heads, T tokens.
"""

from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dozero.errors import DozeroError
from dozero.files import atomic_path


@dataclass
class AttentionResult:
    """The attention of one sentence through a model."""

    token_ids: list[int]
    token_bytes: list[bytes]
    """The bytes of each token (byte-level BPE pieces can be parts of a character)."""
    labels: list[str]
    """One readable label per token (see `token_labels`)."""
    weights: torch.Tensor
    """(L, nh, T, T) float32 on the CPU: weights[l, h, i, j] = how much token i looks at token j."""
    notes: list[str] = field(default_factory=list)
    """What was changed on the way (a cropped sentence), for the user to read."""

    @property
    def average(self) -> torch.Tensor:
        """(T, T): the weights averaged over all layers and heads (rows still sum to 1)."""
        return self.weights.mean(dim=(0, 1))


def token_labels(pieces: list[bytes]) -> list[str]:
    """A readable label per token, even when a token holds only part of a multi-byte character.

    Byte-level BPE can split "á" (two UTF-8 bytes) across two tokens; decoding each alone gives
    U+FFFD. Instead, each character of the sentence is given to the token holding its last byte;
    a token that completes no character is shown as its bytes in hex. Spaces show as '␣' and
    newlines as '↵' so the reader sees where they are.
    """
    data = b"".join(pieces)
    ends, end = [], 0
    for piece in pieces:
        end += len(piece)
        ends.append(end)  # byte offset where each token ends
    labels = [""] * len(pieces)
    text = data.decode("utf-8", errors="replace")
    byte_pos, token = 0, 0
    for ch in text:
        # U+FFFD from one invalid byte stands for that single byte.
        byte_pos += 1 if ch == "\ufffd" else len(ch.encode("utf-8"))
        while token < len(ends) - 1 and byte_pos > ends[token]:
            token += 1
        labels[token] += ch
    for i, label in enumerate(labels):
        if not label:
            labels[i] = "".join(f"\\x{b:02x}" for b in pieces[i])
    return [label.replace(" ", "␣").replace("\n", "↵") for label in labels]


def check_attention_support(model) -> None:
    """Raise a clear error unless `model` is a dozero GPTModel with the explicit attention path."""
    from dozero.model.gpt import GPTModel

    if not isinstance(model, GPTModel) or "return_attention" not in inspect.signature(model.forward).parameters:
        raise DozeroError(
            f"this model ({type(model).__name__}) has no explicit attention path to read weights from; "
            "`dozero attention` needs a dozero GPTModel in full precision (a trained run folder, a dozero "
            "model folder or a Hugging Face GPT-2 folder)"
        )


@torch.no_grad()
def compute_attention(model, tokenizer, text: str) -> AttentionResult:
    """Encode `text`, run the explicit attention path, return the weights of every layer and head.

    A sentence longer than the model's context is cropped to its first `context_length` tokens
    (said in `notes`).
    """
    check_attention_support(model)
    ids = tokenizer.encode(text)
    if not ids:
        raise DozeroError('the sentence is empty; give some text, e.g. "A cachorra correu atrás da bola."')
    notes = []
    context = model.cfg.context_length
    if len(ids) > context:
        notes.append(
            f"the sentence has {len(ids)} tokens but the model's context is {context}; "
            f"only the first {context} tokens are used"
        )
        ids = ids[:context]
    if max(ids) >= model.cfg.vocab_size:
        raise DozeroError(
            f"the tokenizer gave token id {max(ids)} but the model has only {model.cfg.vocab_size} ids; "
            "use the tokenizer saved with this model"
        )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout: the weights shown are the ones the model uses at inference
    try:
        _, per_layer = model(torch.tensor([ids], device=device), return_attention=True)
    finally:
        model.train(was_training)
    if any(w is None for w in per_layer):
        raise DozeroError("the model returned no attention weights; it does not support `return_attention`")
    weights = torch.stack([w[0] for w in per_layer]).float().cpu()  # (L, nh, T, T)
    pieces = [tokenizer.decode_bytes([i]) for i in ids]
    return AttentionResult(ids, pieces, token_labels(pieces), weights, notes)


def find_token(result: AttentionResult, text: str | None, index: int | None, sentence: str) -> int:
    """The position of the token to explain: `index` (negative counts from the end), or the token
    that ends the first whole-word occurrence of `text` in the sentence (a substring otherwise);
    default: the last token."""
    n = len(result.token_ids)
    listing = ", ".join(f"{i}:{label}" for i, label in enumerate(result.labels))
    if index is not None:
        if not -n <= index < n:
            raise DozeroError(f"token index {index} is out of range: the sentence has {n} tokens ({listing})")
        return index % n
    if text is None:
        return n - 1
    match = re.search(rf"(?<!\w){re.escape(text)}(?!\w)", sentence) or re.search(re.escape(text), sentence)
    if match is None:
        raise DozeroError(f"'{text}' is not in the sentence; give --index N with one of the tokens: {listing}")
    # The token holding the match's last byte: after it, the model has read the whole word.
    last_byte = len(sentence[: match.end()].encode("utf-8"))
    end = 0
    for position, piece in enumerate(result.token_bytes):
        end += len(piece)
        if end >= last_byte:
            return position
    raise DozeroError(f"'{text}' lies beyond the tokens the model read (cropped); tokens: {listing}")


def top_attended(weights_row: torch.Tensor, position: int, k: int = 5) -> list[tuple[int, float]]:
    """The k earlier positions (< position) with the largest weight in a row of T weights."""
    if position == 0:
        return []
    earlier = weights_row[:position]
    values, order = torch.sort(earlier, descending=True)
    return [(int(j), float(v)) for j, v in zip(order[:k], values[:k], strict=True)]


def word_of_each_token(pieces: list[bytes]) -> tuple[list[str], list[int | None]]:
    """(the words of the text, the word index of each token): a token belongs to the word holding its
    first non-space byte (None for a token of spaces only). A word is a run of letters/digits or of
    punctuation, so "ela" is one word whether the tokenizer cut it into ' el' + 'a' or 'e', 'l', 'a'."""
    text = b"".join(pieces).decode("utf-8", errors="replace")
    spans, words = [], []
    for m in re.finditer(r"\w+|[^\w\s]+", text):
        spans.append((len(text[: m.start()].encode()), len(text[: m.end()].encode())))
        words.append(m.group())
    owner, at = [], 0
    for piece in pieces:
        skip = len(piece) - len(piece.lstrip())  # leading spaces belong to no word
        first = at + skip if skip < len(piece) else None
        owner.append(next((w for w, (a, b) in enumerate(spans) if first is not None and a <= first < b), None))
        at += len(piece)
    return words, owner


def words_attended(row: torch.Tensor, position: int, words, owner, sink: bool = True) -> list[tuple[int, float]]:
    """Earlier words ranked by the weight of their tokens added up (the chosen token's own word left out).

    `sink`: the first token is set aside. Trained models park the weight a head has no use for on the
    first token, whatever it is (an "attention sink", Xiao et al. 2023): SmolLM2 gives it half of all
    attention. The ranking is then about the words the weight was really spent on."""
    totals: dict[int, float] = {}
    for j in range(1 if sink else 0, position):
        w = owner[j]
        if w is not None and w != owner[position]:
            totals[w] = totals.get(w, 0.0) + float(row[j])
    return sorted(totals.items(), key=lambda item: -item[1])


def describe(result: AttentionResult, position: int, k: int = 5) -> str:
    """The report printed by `dozero attention`: where the chosen token looks, on average and in
    the last layer; then by word, and in each layer, with the first token's sink set aside."""
    label = result.labels[position]
    lines = [f"token {position} '{label}' attends most to (the top earlier tokens, then its own weight):"]
    views = [("average over all layers and heads", result.average[position])]
    L = result.weights.shape[0]
    views.append((f"last layer (layer {L - 1}), average over heads", result.weights[-1].mean(0)[position]))
    for title, row in views:
        lines.append(f"  {title}:")
        ranked = top_attended(row, position, k)
        if not ranked:
            lines.append("    (it is the first token: there is nothing earlier to look at)")
        for j, weight in ranked:
            lines.append(f"    {weight:6.3f}  {j:3d} '{result.labels[j]}'  {'#' * round(weight * 40)}")
        lines.append(f"    {float(row[position]):6.3f}  itself")
    return "\n".join(lines + word_summary(result, position, k))


def word_summary(result: AttentionResult, position: int, k: int = 5) -> list[str]:
    """The lines that answer the course's question by word: all layers together, then layer by layer."""
    lines, L = [], result.weights.shape[0]
    words, owner = word_of_each_token(result.token_bytes)
    ranked = words_attended(result.average[position], position, words, owner)
    if ranked and position > 1:
        sink = float(result.average[position][0])
        lines.append(f"  by word, all layers and heads (the first token, an attention sink, set aside: {sink:.3f}):")
        for w, weight in ranked[:k]:
            lines.append(f"    {weight:6.3f}  {words[w]!r:14}  {'#' * round(weight * 40)}")
        lines.append("  the earlier word each layer looks at most (heads averaged; the head that looks at it most):")
        for layer in range(L):
            per_head = result.weights[layer, :, position]  # (nh, T)
            best_w, weight = words_attended(per_head.mean(0), position, words, owner)[0]
            by_head = [
                dict(words_attended(per_head[h], position, words, owner)).get(best_w, 0.0) for h in range(len(per_head))
            ]
            head = max(range(len(by_head)), key=by_head.__getitem__)
            lines.append(
                f"    layer {layer:2d}: {words[best_w]!r:14} {weight:5.3f}   head {head}: {by_head[head]:5.3f}"
            )
        lines.append("  the one head that looks hardest at each earlier word:")
        strongest = {}  # word -> (weight, layer, head)
        for layer in range(L):
            for head in range(result.weights.shape[1]):
                for w, weight in words_attended(result.weights[layer, head, position], position, words, owner):
                    strongest[w] = max(strongest.get(w, (0.0, 0, 0)), (weight, layer, head))
        for w, (weight, layer, head) in sorted(strongest.items()):
            lines.append(f"    {words[w]!r:14} {weight:5.3f}  (layer {layer}, head {head})")
    return lines


def plot_attention(result: AttentionResult, path, title: str = "", highlight: int | None = None) -> None:
    """One PNG: the average map with token labels (left), a grid of every layer x head (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, nh, T, _ = result.weights.shape
    cell = 1.0 if L * nh <= 16 else 0.55 if L * nh <= 64 else 0.42  # inches per small map
    grid_w, grid_h = nh * cell, L * cell
    avg_size = max(4.0, min(8.0, 0.22 * T + 1.5))
    height = max(avg_size, grid_h)
    fig = plt.figure(figsize=(avg_size + grid_w + 1.5, height + 0.8))
    outer = fig.add_gridspec(1, 2, width_ratios=[avg_size, grid_w], wspace=0.15)

    # The first rows have few tokens to share their weight (row 0 is always 1.0); scaling the colours
    # to the rest keeps the later rows readable.
    average = result.average.numpy()
    vmax = float(average[2:].max()) if T > 2 else 1.0
    ax = fig.add_subplot(outer[0])
    image = ax.imshow(average, cmap="viridis", vmin=0.0, vmax=vmax)
    ax.set_xticks(range(T), result.labels, rotation=90, fontsize=7 if T > 40 else 8)
    ax.set_yticks(range(T), result.labels, fontsize=7 if T > 40 else 8)
    ax.set_xlabel("looks at (key)")
    ax.set_ylabel("token (query)")
    ax.set_title("average of all layers and heads", fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    if highlight is not None:
        ax.add_patch(plt.Rectangle((-0.5, highlight - 0.5), T, 1, fill=False, edgecolor="red", linewidth=1.5))

    # Every layer (rows) x head (columns), each with its own colour scale, packed at the top.
    right = outer[1].subgridspec(2, 1, height_ratios=[grid_h, max(height - grid_h, 1e-3)])
    grid = right[0].subgridspec(L, nh, wspace=0.06, hspace=0.06)
    for layer in range(L):
        for head in range(nh):
            sub = fig.add_subplot(grid[layer, head])
            sub.imshow(result.weights[layer, head].numpy(), cmap="viridis", vmin=0.0)
            sub.set_xticks([])
            sub.set_yticks([])
            if layer == 0:
                sub.set_title(f"h{head}", fontsize=7)
            if head == 0:
                sub.set_ylabel(f"L{layer}", fontsize=7, rotation=0, labelpad=8)
    fig.text(0.5, 0.98, title or "attention weights", ha="center", va="top", fontsize=11)
    _save_atomically(fig, path)
    plt.close(fig)


def _save_atomically(fig, path) -> None:
    """Write the PNG to a temporary file beside `path`, then rename: never a half-written image."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")


def explain(
    model,
    tokenizer,
    sentence: str,
    out,
    token: str | None = None,
    index: int | None = None,
    title: str = "",
    top_k: int = 5,
    log=print,
) -> AttentionResult:
    """The whole `dozero attention` command as a function: weights, PNG, printed ranking."""
    result = compute_attention(model, tokenizer, sentence)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    position = find_token(result, token, index, sentence)
    log(f"{len(result.token_ids)} tokens: " + " ".join(f"{i}:{label}" for i, label in enumerate(result.labels)))
    log(describe(result, position, top_k))
    plot_attention(result, out, title=title, highlight=position)
    log(f"heatmap written to {out}")
    return result


def load_for_attention(spec: str, device: str = "cpu", seed: int = 0):
    """(model, tokenizer, one line saying what was loaded) for a run/model folder or a preset name.

    A preset has no weights: the model is freshly initialized (seeded), with GPT-2's vocabulary for
    the GPT-2 shapes and the character vocabulary of the shipped tiny-Shakespeare for the char ones.
    """
    from dozero.config import MODEL_PRESETS, get_model_config, suggest
    from dozero.model.gguf import is_gguf
    from dozero.runtime import pick_device

    torch_device = pick_device(device)
    if Path(spec).exists() or is_gguf(spec):  # a folder, a GGUF file, or a GGUF's short name (smollm2-135m-instruct)
        from dozero.model.checkpoint import load_model, resolve_model_dir
        from dozero.tokenizer import load_tokenizer

        model = load_model(spec, device=torch_device)
        check_attention_support(model)
        folder = resolve_model_dir(spec)
        tokenizer = load_tokenizer(folder)
        tokenizer.check_fits_model(model.cfg.vocab_size, f"the model in {folder}")
        return model.float().eval(), tokenizer, f"model: {folder} (trained weights)"
    if spec not in MODEL_PRESETS:
        raise DozeroError(f"--model '{spec}' is neither a folder nor a preset: {suggest(spec, MODEL_PRESETS)}")
    from dozero.model.gpt import GPTModel

    cfg = get_model_config(spec)
    torch.manual_seed(seed)
    model = GPTModel(cfg).to(torch_device).eval()
    if cfg.vocab_size >= 50257:
        from dozero.tokenizer import load_tokenizer

        tokenizer = load_tokenizer("gpt2")
    else:
        from importlib.resources import files

        from dozero.tokenizer.char import CharTokenizer

        tokenizer = CharTokenizer.from_text((files("dozero") / "assets" / "tinyshakespeare.txt").read_text("utf-8"))
    return (
        model,
        tokenizer,
        (
            f"model: preset '{spec}' with RANDOM weights (seed {seed}): the picture shows no learned pattern; "
            "give a trained run folder (dozero train) or a GPT-2 folder to see real attention"
        ),
    )
