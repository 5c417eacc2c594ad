"""Config differences, written as the `--config.<path>=<value>` flags that reproduce them.

The study's report shows each arm and stage as overrides of a shipped config; the same
differences tell whether a workdir or a recorded run was made with the config the study runs.
"""
import re
import shlex


def flatten(tree, prefix: str = "") -> dict:
  """{"a.b.c": leaf} of a ConfigDict / nested dict; tuples and lists are leaves."""
  if hasattr(tree, "to_dict"):
    tree = tree.to_dict()
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, dict) or hasattr(value, "to_dict"):
      out.update(flatten(value, path + "."))
    else:
      out[path] = value
  return out


def normalized(value):
  """Tuples as lists (a config read back from JSON holds lists)."""
  if isinstance(value, (tuple, list)):
    return [normalized(v) for v in value]
  return value


def config_diff(base, config) -> tuple[dict, list[str]]:
  """({path: new value} changed or added, [removed paths]) of `config` against `base`.

  A removed subtree (e.g. evals.gcap) is listed once, by its top-most missing node.
  """
  a, b = flatten(base), flatten(config)
  changed = {k: v for k, v in b.items() if k not in a or normalized(a[k]) != normalized(v)}
  removed = []
  for k in sorted(k for k in a if k not in b):
    parts = k.split(".")
    for n in range(1, len(parts) + 1):
      node = ".".join(parts[:n])
      if not any(x == node or x.startswith(node + ".") for x in b):
        if node not in removed:
          removed.append(node)
        break
  return changed, removed


_PLAIN = re.compile(r"^[\w./:@+=-]*$")  # needs no shell quoting


def flag_line(path: str, value) -> str:
  """`--config.<path>=<value>` as one shell word (ml_collections parses the literal)."""
  if isinstance(value, list):
    value = tuple(value)
  word = f"--config.{path}={value if isinstance(value, str) else repr(value)}"
  if _PLAIN.match(word):
    return word
  return f'"{word}"' if not set(word) & set('"$`\\!') else shlex.quote(word)


def train_command(config_name: str, base, config, workdir: str) -> list[str]:
  """The `python -m locca_jax.train` command running `config` (as overrides of `base`), one
  flag per line, then the fields no flag can remove, as comments."""
  lines = override_lines(base, config)
  return ([f"python -m locca_jax.train --config={config_name} \\"]
          + [f"    {line} \\" for line in lines if not line.startswith("#")]
          + [f"    --workdir={workdir}", ""]
          + [line for line in lines if line.startswith("#")])


def override_lines(base, config) -> list[str]:
  """`config` as --config flags over `base`, sorted, then a comment per field it removes."""
  changed, removed = config_diff(base, config)
  lines = [flag_line(k, v) for k, v in sorted(changed.items())]
  lines += [f"# and without config.{k} (no flag deletes a field: the study drops it)"
            for k in removed]
  return lines
