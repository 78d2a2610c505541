"""With several processes each evaluates its share of the images (image i by process
i % count), never one twice, the first `max_images` only; random-access datasets are
indexed, other iterables read once and skipped past."""

import jax
import pytest

from mtaclip_jax.evaluation import evaluate


@pytest.mark.parametrize("random_access", [True, False])
@pytest.mark.parametrize("count,max_images", [(1, 0), (2, 0), (3, 0), (3, 5), (4, 2)])
def test_each_image_is_evaluated_once(monkeypatch, random_access, count, max_images):
  images = list(range(7))
  shares = []
  for index in range(count):
    monkeypatch.setattr(jax, "process_count", lambda count=count: count)
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    data = images if random_access else iter(images)
    shares.append(list(evaluate.this_process_share(data, max_images)))
  if count == 1:  # the dataset itself (max_images is then the loop's to apply)
    assert shares == [images]
    return
  wanted = images[:max_images] if max_images else images
  assert sorted(sum(shares, [])) == wanted
  for index, share in enumerate(shares):
    assert share == wanted[index::count]
