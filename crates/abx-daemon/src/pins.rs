//! What creates in flight are about to use.
//!
//! A create reads its template's layers and checks its volumes, then takes milliseconds to
//! set the sandbox up before the sandbox is registered, where garbage collection and volume
//! removal look for users. Without a pin, a `template rm` in that window deleted layers
//! the new sandbox had just mounted, and a `volume rm` a volume it was about to mount.
//!
//! A create resolves and pins under the gate's shared side; a removal checks and deletes
//! under its exclusive side. So a removal either finishes before the create looks (which
//! then finds nothing) or sees the pin (and refuses or keeps the object).

use std::collections::HashMap;
use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Pinned objects, counted: several creates may pin the same layer.
#[derive(Debug, Default)]
pub struct Pins {
    gate: RwLock<()>,
    held: Mutex<HashMap<Pin, usize>>,
}

/// One pinned object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pin {
    /// A layer digest.
    Layer(String),
    /// A volume name.
    Volume(String),
}

impl Pins {
    /// Held by a create while it resolves what it uses, until it has pinned it.
    pub fn resolving(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Held by a removal while it checks for users and deletes.
    pub fn removing(&self) -> RwLockWriteGuard<'_, ()> {
        self.gate.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Pins `objects` until the guard drops.
    pub fn pin(&self, objects: impl IntoIterator<Item = Pin>) -> Pinned<'_> {
        let objects: Vec<Pin> = objects.into_iter().collect();
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for o in &objects {
            *held.entry(o.clone()).or_default() += 1;
        }
        Pinned { pins: self, objects }
    }

    /// The layers pinned now.
    pub fn layers(&self) -> Vec<String> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.keys()
            .filter_map(|p| match p {
                Pin::Layer(d) => Some(d.clone()),
                Pin::Volume(_) => None,
            })
            .collect()
    }

    /// Whether a create in flight is about to mount volume `name`.
    pub fn has_volume(&self, name: &str) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).contains_key(&Pin::Volume(name.to_string()))
    }
}

/// Unpins on drop.
#[derive(Debug)]
pub struct Pinned<'a> {
    pins: &'a Pins,
    objects: Vec<Pin>,
}

impl Drop for Pinned<'_> {
    fn drop(&mut self) {
        let mut held = self.pins.held.lock().unwrap_or_else(|e| e.into_inner());
        for o in self.objects.drain(..) {
            if let Some(n) = held.get_mut(&o) {
                *n -= 1;
                if *n == 0 {
                    held.remove(&o);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_counted_and_released_on_drop() {
        let pins = Pins::default();
        let a = pins.pin([Pin::Layer("l1".into()), Pin::Volume("v".into())]);
        let b = pins.pin([Pin::Layer("l1".into())]);
        assert_eq!(pins.layers(), ["l1"]);
        assert!(pins.has_volume("v") && !pins.has_volume("w"));
        drop(a);
        assert_eq!(pins.layers(), ["l1"], "still pinned by the second create");
        assert!(!pins.has_volume("v"));
        drop(b);
        assert!(pins.layers().is_empty());
    }

    #[test]
    fn a_removal_waits_for_a_create_that_is_resolving() {
        let pins = std::sync::Arc::new(Pins::default());
        let gate = pins.resolving();
        let p2 = pins.clone();
        let removal = std::thread::spawn(move || {
            let _g = p2.removing();
            p2.layers()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let pinned = pins.pin([Pin::Layer("l1".into())]);
        drop(gate);
        assert_eq!(removal.join().unwrap(), ["l1"], "the removal sees the pin made before the gate opened");
        drop(pinned);
    }
}
