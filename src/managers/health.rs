//! Health from usage and fragmentation, by one documented formula (docs/protocol.md).

use crate::domain::MemoryHealthStatus;

/// `(1 − largest_free / free) × 100`, 0 when nothing is free.
pub fn fragmentation_percentage(free_bytes: u64, largest_free_block: u64) -> f64 {
    if free_bytes == 0 {
        return 0.0;
    }
    let largest = largest_free_block.min(free_bytes) as f64;
    (1.0 - largest / free_bytes as f64) * 100.0
}

/// `health_score` (0..100): `100 × (1 − 0.7·p − 0.3·f/100)` where `p = clamp((u − 50)/50, 0, 1)`,
/// `u` is the budget usage percentage and `f` the fragmentation percentage; one decimal.
pub fn health_score(usage_percentage: f64, fragmentation_percentage: f64) -> f64 {
    let p = ((usage_percentage - 50.0) / 50.0).clamp(0.0, 1.0);
    let f = fragmentation_percentage.clamp(0.0, 100.0) / 100.0;
    let score = 100.0 * (1.0 - 0.7 * p - 0.3 * f);
    (score.clamp(0.0, 100.0) * 10.0).round() / 10.0
}

/// Critical when usage ≥ 95% or the score < 40; Warning when usage ≥ 80%, fragmentation ≥ 50%
/// or the score < 70; else Healthy.
pub fn health(usage_percentage: f64, fragmentation_percentage: f64) -> MemoryHealthStatus {
    let score = health_score(usage_percentage, fragmentation_percentage);
    if usage_percentage >= 95.0 || score < 40.0 {
        MemoryHealthStatus::Critical
    } else if usage_percentage >= 80.0 || fragmentation_percentage >= 50.0 || score < 70.0 {
        MemoryHealthStatus::Warning
    } else {
        MemoryHealthStatus::Healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragmentation_follows_the_contract() {
        assert_eq!(fragmentation_percentage(0, 0), 0.0);
        assert_eq!(fragmentation_percentage(100, 100), 0.0);
        assert_eq!(fragmentation_percentage(100, 25), 75.0);
    }

    #[test]
    fn health_bands() {
        assert_eq!(health_score(10.0, 0.0), 100.0);
        assert_eq!(health(10.0, 0.0), MemoryHealthStatus::Healthy);
        assert_eq!(health(85.0, 0.0), MemoryHealthStatus::Warning);
        assert_eq!(health(96.0, 0.0), MemoryHealthStatus::Critical);
        assert_eq!(health(10.0, 60.0), MemoryHealthStatus::Warning);
        assert_eq!(health_score(100.0, 100.0), 0.0);
    }
}
