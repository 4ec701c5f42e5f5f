//! Layer counts of `config.json` against the layers the weights hold: a config with fewer
//! layers than the checkpoint (a config from a smaller model, an edited count) would
//! export a model that silently skips layers, so it is refused, naming the config key and
//! the first unused tensors.

use std::collections::BTreeMap;
use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::{ExportError, Result};

/// Tensors shown in the error before "and N more".
const SHOWN: usize = 3;

/// A stack of layers: tensors named `{prefix}{i}.…` for i below `count`, which the config
/// key `key` sets.
pub struct Stack<'a> {
    pub prefix: &'a str,
    pub key: &'a str,
    pub count: usize,
}

/// Fails when the checkpoint holds tensors of a layer at or past its stack's count.
pub fn check(config_path: &Path, ck: &Checkpoint, stacks: &[Stack<'_>]) -> Result<()> {
    for s in stacks {
        // Unused tensors, in layer order then by name.
        let mut unused: BTreeMap<(usize, &str), ()> = BTreeMap::new();
        for name in ck.names() {
            let Some(rest) = name.strip_prefix(s.prefix) else { continue };
            let Some((index, _)) = rest.split_once('.') else { continue };
            let Ok(i) = index.parse::<usize>() else { continue };
            if i >= s.count {
                unused.insert((i, name), ());
            }
        }
        if unused.is_empty() {
            continue;
        }
        let layers = unused.keys().map(|(i, _)| i).max().map_or(0, |m| m + 1);
        let names: Vec<&str> = unused.keys().map(|(_, n)| *n).collect();
        let mut list = names.iter().take(SHOWN).copied().collect::<Vec<_>>().join(", ");
        if names.len() > SHOWN {
            list.push_str(&format!(" and {} more", names.len() - SHOWN));
        }
        return Err(ExportError::Config {
            path: config_path.into(),
            message: format!(
                "{} is {}, but the weights hold {layers} layers ({}0 to {}{}); the export would leave {} tensors unused: {list}. \
                 Use the config.json that came with these weights",
                s.key,
                s.count,
                s.prefix,
                s.prefix,
                layers - 1,
                names.len()
            ),
        });
    }
    Ok(())
}
