//! The agent's store as the consistency methods' journal: the engine wires
//! its two adapters together here, so neither imports the other.

use soda_syncer_domain::consistency::HeldResource;

use crate::consistency::Records;
use crate::store::Store;

impl Records for Store {
    fn record_held(&self, r: &HeldResource) -> Result<(), String> {
        self.record_resource(r).map_err(|e| e.to_string())
    }

    fn clear_held(&self, id: &str) -> Result<(), String> {
        self.clear_resource(id).map_err(|e| e.to_string())
    }

    fn all_held(&self) -> Result<Vec<HeldResource>, String> {
        self.held_resources().map_err(|e| e.to_string())
    }

    fn policy_exists(&self, id: &str) -> bool {
        self.get_policy(id).is_ok()
    }
}
