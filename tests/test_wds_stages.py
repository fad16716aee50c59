"""shardkit's decode and PixArt batching as stages of a stock webdataset pipeline."""

from __future__ import annotations

import json

import pytest
import torch
import webdataset as wds

from shardkit.errors import ShardFormatError, ShardkitError
from shardkit.reader import PixArtCollate, ShardReader, WebDatasetStages
from shardkit.reader.stages import DecodedSample

OPTIONS = dict(real_prompt_ratio=0.5, caption_dropout=0.3, seed=7)


def _shard_urls(build) -> list[str]:
    manifest = json.loads((build / "manifest.json").read_text())
    return [str(build / entry["path"]) for entry in manifest["shards"]]


def _assert_equal_batches(got: list[dict], expected: list[dict]) -> None:
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    for mine, theirs in zip(got, expected, strict=True):
        for name in ("latent", "caption_feature", "attention_mask"):
            assert torch.equal(mine[name], theirs[name]), name
        for name in ("img_hw", "aspect_ratio"):
            assert torch.equal(mine["data_info"][name], theirs["data_info"][name]), name
        assert mine["prompt"] == theirs["prompt"] and mine["caption_field"] == theirs["caption_field"]


def test_a_webdataset_pipeline_with_shardkit_stages_gives_the_reader_s_batches(toy_build):
    stages = WebDatasetStages(toy_build, batch_size=3, layout="dict", **OPTIONS)
    reader = ShardReader(toy_build, batch_size=3, layout="dict", shuffle=False, **OPTIONS)
    urls = _shard_urls(toy_build)
    pipelines = {
        "WebDataset": wds.WebDataset(urls, shardshuffle=False).compose(stages.decode).compose(stages.batches),
        "DataPipeline": wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), stages.decode,
                                         stages.batches),
    }
    for epoch in (0, 1):
        stages.set_epoch(epoch)
        reader.set_epoch(epoch)
        expected = list(reader)
        assert any("" in b["prompt"] for b in expected)  # dropout and the caption draw are part of what is compared
        for name, pipeline in pipelines.items():
            _assert_equal_batches(list(pipeline), expected)


def test_batches_equal_the_collate_of_the_same_samples_and_stay_one_bucket(toy_build):
    stages = WebDatasetStages(toy_build, batch_size=2, **OPTIONS)
    decoded: list[DecodedSample] = list(stages.decode(wds.WebDataset(_shard_urls(toy_build), shardshuffle=False)))
    collate = PixArtCollate(max_length=300, seed=7)
    by_key = {s.key: s for s in decoded}
    batches = list(stages.batches(iter(decoded)))
    assert sum(len(b[0]) for b in batches) == len(decoded)  # tails kept: every sample once
    keyed = WebDatasetStages(toy_build, batch_size=2, layout="dict", **OPTIONS).batches(iter(decoded))
    for (latent, feature, mask, info), with_keys in zip(batches, keyed, strict=True):
        samples = [by_key[key] for key in with_keys["keys"]]
        assert len({s.bucket for s in samples}) == 1
        expected = collate(samples, 0)
        assert torch.equal(latent, expected[0]) and torch.equal(feature, expected[1]) and torch.equal(mask, expected[2])
        assert torch.equal(info["img_hw"], expected[3]["img_hw"])
    dropped = WebDatasetStages(toy_build, batch_size=2, drop_last=True, **OPTIONS).batches(iter(decoded))
    assert all(len(b[0]) == 2 for b in dropped)


def test_stages_refuse_decoded_members_and_bad_options(toy_build):
    stages = WebDatasetStages(toy_build, batch_size=2)
    decoded_first = wds.WebDataset(_shard_urls(toy_build), shardshuffle=False).decode().compose(stages.decode)
    with pytest.raises(ShardFormatError, match="before any .decode"):
        next(iter(decoded_first))
    with pytest.raises(ShardkitError, match="batch_size"):
        WebDatasetStages(toy_build, batch_size=0)
    with pytest.raises(ShardkitError, match="layout must be one of"):
        WebDatasetStages(toy_build, batch_size=2, layout="list")
    with pytest.raises(ShardkitError, match="pass the build folder or its manifest.json"):
        WebDatasetStages(_shard_urls(toy_build), batch_size=2)
