# The Conveyer README's Join example, run on tensorcom: only the import line changed (`from conveyer import Join`
# became `from tensorcom.pipeline import Join`).
#
# Filled in where the seed leaves the work to the user (marked "filled in"): the imports of the earlier example
# that this snippet relies on; the three `Conveyer(...)`, small stand-ins for the datasets (each item says which
# dataset and which sample it is); and the README's promises, checked and printed as JSON:
# - the mix is 70% imagenet, 25% lsun and 5% cifar1k (exactly so in every 20 consecutive items);
# - with weights set to the datasets' sizes (they need not sum to 1), one epoch of the mix reads every sample of
#   every dataset once.
import collections
import functools
import json

from tensorcom.pipeline import Conveyer, Join, Map, Permutation  # Conveyer, Map, Permutation: filled in


def tagged(name: str, index: int) -> tuple[str, int]:
    """Filled in: what a sample of each stand-in dataset is."""
    return name, index


def dataset(name: str, size: int, repeating: bool = True) -> Conveyer:
    """Filled in: a shuffled stand-in dataset of ``size`` samples."""
    return Conveyer(
        [Permutation(size, seed=len(name), repeating=repeating), Map(functools.partial(tagged, name))]
    )


# fmt: off
imagenet = dataset("imagenet", 1400)  # filled in: Conveyer(...)
cifar1k = dataset("cifar1k", 100)  # filled in: Conveyer(...)
lsun = dataset("lsun", 500)  # filled in: Conveyer(...)
pipeline = Join([
    (imagenet, .7),
    (lsun, .25),
    (cifar1k, .05),
])
# fmt: on

# filled in: the promises, shown
first = [next(pipeline) for _ in range(200)]
windows = {
    collections.Counter(name for name, _ in first[i : i + 20]).most_common()
    == [("imagenet", 14), ("lsun", 5), ("cifar1k", 1)]
    for i in range(0, 200, 20)
}
by_size = Join(
    [
        (dataset("imagenet", 1400, repeating=False), 1400),
        (dataset("lsun", 500, repeating=False), 500),
        (dataset("cifar1k", 100, repeating=False), 100),
    ]
)
epoch = list(by_size)
print(
    json.dumps(
        {
            "first_200": dict(collections.Counter(name for name, _ in first)),
            "every_20_in_proportion": windows == {True},
            "epoch_items": len(epoch),
            "epoch_complete": {
                name: sorted(index for source, index in epoch if source == name) == list(range(size))
                for name, size in (("imagenet", 1400), ("lsun", 500), ("cifar1k", 100))
            },
        }
    )
)
