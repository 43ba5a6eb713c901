"""A tiny random Llama with an in-memory word-level tokenizer: the model of the test suite, of the synthetic task
families (:mod:`abmll.synthetic`) and of the benchmarks. Built from a config in a fraction of a second, with no
download."""

from __future__ import annotations

from typing import Any

import torch

from abmll.errors import ModelError

__all__ = ["TINY_WORDS", "tiny_llama", "tiny_tokenizer"]


TINY_SPECIALS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")

TINY_WORDS = """
a about above across after again against all almost alone along already also always am among an and animal
animals another answer any are area around as ask at away back bad be because become bed been before began
begin behind being below best better between big bird black blue boat body book both box boy bring brother
brown build but buy by call came can car care carry cat cause change child children city class clean close
cold color come common complete could country cut dark day did different do does dog done door down draw
dream drink drive dry during each early earth east eat end energy enough even evening ever every eye face
fact fall false family far fast father feel few field find fire first fish five floor fly follow food foot
for force form found four free friend from front full game gave get girl give go good got great green
ground group grow had half hand happy hard has have he head hear heat help her here high him his hold home
horse hot hour house how however i ice idea if important in inside into is it its just keep kind king know
land large last late learn leave left less let letter life light like line list little live long look lost
lot love low made make man many map may me mean men might mile milk mind money moon more morning most mother
mountain move much music must my name near need negative neutral never new next night no north not nothing
now number of off often old on once one only open or order other our out outside over own page paper part
people person picture place plant plants play point positive power put question quick quickly rain ran read
ready real red remember rest right river road rock room round run said same sat saw say school sea second see
seen sentence set she ship short should show side simple since sing sister sit six size sky sleep slow small
snow so some something song soon sound south space speak stand star start state stay still stone stop story
street strong study such summer sun sure table take talk teacher tell ten than that the their them then there
these they thing things think third this those though thought three through time to today together told too
took top toward tree true try turn two under understand until up upon us use very voice walk wall want warm
was watch water way we weather week well went were west what when where which while white who why will wind
window winter with without woman wood word words work world would write wrong year yes yet you young your
""".split()

TINY_PUNCTUATION = tuple(".,?!:;'\"-()/+=*%$&")


def _tiny_vocab() -> dict[str, int]:
    tokens: list[str] = list(TINY_SPECIALS)
    tokens += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    tokens += [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens += [str(d) for d in range(10)]
    tokens += list(TINY_PUNCTUATION)
    for word in TINY_WORDS:
        tokens += [word, word.capitalize()]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def tiny_tokenizer() -> Any:
    """A word-level tokenizer built in memory (no downloads): ~600 common English words (lower-case and
    capitalised), letters, digits and punctuation; unknown words map to ``[UNK]``.

    Text is split on whitespace, punctuation characters and single digits, and no special tokens are added
    on encoding, so ``encode(prompt) + encode(" " + option) == encode(prompt + " " + option)``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=_tiny_vocab(), unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        model_max_length=512,
    )


def tiny_llama(vocab_size: int | None = None, seed: int = 0, layers: int = 2) -> tuple[Any, Any]:
    """A tiny random ``LlamaForCausalLM`` (``layers`` decoder blocks, hidden 64, 4 heads, 2 KV heads, intermediate 128,
    tied embeddings) and its in-memory tokenizer (:func:`tiny_tokenizer`), in eval mode.

    ``vocab_size`` defaults to the tokenizer's size; a larger value pads the embedding. The weights depend
    only on ``seed`` (the global torch RNG is left untouched).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    n_tokens = len(tokenizer)
    if vocab_size is None:
        vocab_size = n_tokens
    if vocab_size < n_tokens:
        raise ModelError(
            f"tiny_llama: vocab_size={vocab_size} is smaller than the tokenizer's {n_tokens} tokens"
        )
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32).eval(), tokenizer
