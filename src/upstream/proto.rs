//! `daemoneye_lib::proto`: every message of DaemonEye's current schema, its
//! `Proto*` aliases and its helper constructors.
//!
//! The types are this crate's own ([`crate::proto`], generated from the
//! same schema), so a message built here goes on the wire as it is, and a
//! field this crate does not use is still relayed.

pub use crate::proto::*;

// DaemonEye's names for some of them, the same types.
pub use crate::proto::{
    CapabilityRequest as ProtoCapabilityRequest, CapabilityResponse as ProtoCapabilityResponse,
    HashCheck as ProtoHashCheck, HashResult as ProtoHashResult,
    ProcessFilter as ProtoProcessFilter, ProcessRecord as ProtoProcessRecord,
    TaskType as ProtoTaskType,
};

impl DetectionTask {
    /// A task listing processes, narrowed by `filter`.
    pub fn new_enumerate_processes(
        task_id: impl Into<String>,
        filter: Option<ProtoProcessFilter>,
    ) -> Self {
        DetectionTask {
            task_id: task_id.into(),
            task_type: TaskType::EnumerateProcesses.into(),
            process_filter: filter,
            ..Default::default()
        }
    }

    /// A task hashing one executable.
    pub fn new_hash_check(task_id: impl Into<String>, hash_check: ProtoHashCheck) -> Self {
        DetectionTask {
            task_id: task_id.into(),
            task_type: TaskType::CheckProcessHash.into(),
            hash_check: Some(hash_check),
            ..Default::default()
        }
    }

    /// A task of any type, with `metadata`.
    pub fn new_test_task(
        task_id: impl Into<String>,
        task_type: TaskType,
        metadata: Option<String>,
    ) -> Self {
        DetectionTask {
            task_id: task_id.into(),
            task_type: task_type.into(),
            metadata,
            ..Default::default()
        }
    }

    /// A task monitoring network connections, narrowed by `filter`.
    pub fn new_network_monitoring(
        task_id: impl Into<String>,
        filter: Option<NetworkFilter>,
    ) -> Self {
        DetectionTask {
            task_id: task_id.into(),
            task_type: TaskType::MonitorNetworkConnections.into(),
            network_filter: filter,
            ..Default::default()
        }
    }

    /// A task tracking file operations, narrowed by `filter`.
    pub fn new_filesystem_monitoring(
        task_id: impl Into<String>,
        filter: Option<FilesystemFilter>,
    ) -> Self {
        DetectionTask {
            task_id: task_id.into(),
            task_type: TaskType::TrackFileOperations.into(),
            filesystem_filter: filter,
            ..Default::default()
        }
    }

    /// A task collecting performance metrics, narrowed by `filter`.
    pub fn new_performance_monitoring(
        task_id: impl Into<String>,
        filter: Option<PerformanceFilter>,
    ) -> Self {
        DetectionTask {
            task_id: task_id.into(),
            task_type: TaskType::CollectPerformanceMetrics.into(),
            performance_filter: filter,
            ..Default::default()
        }
    }
}

impl DetectionResult {
    /// A successful result carrying `processes`.
    pub fn success(task_id: impl Into<String>, processes: Vec<ProtoProcessRecord>) -> Self {
        DetectionResult {
            task_id: task_id.into(),
            success: true,
            processes,
            ..Default::default()
        }
    }

    /// A successful result carrying records of every domain.
    pub fn multi_domain_success(
        task_id: impl Into<String>,
        processes: Vec<ProtoProcessRecord>,
        network_events: Vec<NetworkRecord>,
        filesystem_events: Vec<FilesystemRecord>,
        performance_events: Vec<PerformanceRecord>,
    ) -> Self {
        DetectionResult {
            task_id: task_id.into(),
            success: true,
            processes,
            network_events,
            filesystem_events,
            performance_events,
            ..Default::default()
        }
    }

    /// A failed result saying why.
    pub fn failure(task_id: impl Into<String>, error: impl Into<String>) -> Self {
        DetectionResult {
            task_id: task_id.into(),
            success: false,
            error_message: Some(error.into()),
            ..Default::default()
        }
    }

    /// A successful result carrying a hash.
    pub fn hash_success(task_id: impl Into<String>, hash_result: ProtoHashResult) -> Self {
        DetectionResult {
            task_id: task_id.into(),
            success: true,
            hash_result: Some(hash_result),
            ..Default::default()
        }
    }
}

impl CollectionCapabilities {
    /// Processes only, nothing advanced.
    pub fn basic_process_monitoring() -> Self {
        CollectionCapabilities {
            supported_domains: vec![MonitoringDomain::Process.into()],
            advanced: None,
        }
    }

    /// Every domain, in the order process, network, filesystem,
    /// performance, with `advanced` as given.
    pub fn full_monitoring(advanced: Option<AdvancedCapabilities>) -> Self {
        CollectionCapabilities {
            supported_domains: [
                MonitoringDomain::Process,
                MonitoringDomain::Network,
                MonitoringDomain::Filesystem,
                MonitoringDomain::Performance,
            ]
            .map(i32::from)
            .to_vec(),
            advanced,
        }
    }

    /// Whether `domain` is among the supported ones.
    pub fn supports_domain(&self, domain: MonitoringDomain) -> bool {
        self.supported_domains.contains(&i32::from(domain))
    }

    /// Whether advanced capabilities are given.
    pub const fn has_advanced_capabilities(&self) -> bool {
        self.advanced.is_some()
    }
}

impl AdvancedCapabilities {
    /// Kernel-level, real-time and system-wide.
    pub const fn full_featured() -> Self {
        AdvancedCapabilities {
            kernel_level: true,
            realtime: true,
            system_wide: true,
        }
    }

    /// System-wide only.
    pub const fn basic() -> Self {
        AdvancedCapabilities {
            kernel_level: false,
            realtime: false,
            system_wide: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_helpers_set_what_daemoneyes_do() {
        let task = DetectionTask::new_enumerate_processes(
            "e".to_owned(),
            Some(ProcessFilter {
                pids: vec![1],
                ..Default::default()
            }),
        );
        assert_eq!(task.task_type(), TaskType::EnumerateProcesses);
        assert_eq!(task.process_filter.unwrap().pids, [1]);
        let hash = DetectionTask::new_hash_check("h", HashCheck::default());
        assert_eq!(hash.task_type, 1);
        assert!(hash.hash_check.is_some());
        for (task, task_type) in [
            (
                DetectionTask::new_network_monitoring("n", Some(NetworkFilter::default())),
                4,
            ),
            (DetectionTask::new_filesystem_monitoring("f", None), 5),
            (DetectionTask::new_performance_monitoring("p", None), 6),
            (
                DetectionTask::new_test_task("t", TaskType::VerifyExecutable, Some("m".into())),
                3,
            ),
        ] {
            assert_eq!(task.task_type, task_type);
        }
        assert!(
            DetectionTask::new_network_monitoring("n", Some(NetworkFilter::default()))
                .network_filter
                .is_some()
        );

        let failed = DetectionResult::failure("x", "why");
        assert_eq!(
            (failed.success, failed.error_message.as_deref()),
            (false, Some("why"))
        );
        let multi = DetectionResult::multi_domain_success(
            "m",
            vec![],
            vec![NetworkRecord::default()],
            vec![],
            vec![PerformanceRecord::default()],
        );
        assert!(multi.success);
        assert_eq!(
            (multi.network_events.len(), multi.performance_events.len()),
            (1, 1)
        );
        assert!(
            DetectionResult::hash_success("h", HashResult::default())
                .hash_result
                .is_some()
        );
        assert!(DetectionResult::success("s", vec![ProcessRecord::default()]).success);
    }

    #[test]
    fn capabilities_list_their_domains_in_daemoneyes_order() {
        let full = CollectionCapabilities::full_monitoring(Some(AdvancedCapabilities::basic()));
        assert_eq!(full.supported_domains, [0, 1, 2, 3]);
        assert!(full.supports_domain(MonitoringDomain::Filesystem));
        assert!(full.has_advanced_capabilities());
        let basic = CollectionCapabilities::basic_process_monitoring();
        assert!(basic.supports_domain(MonitoringDomain::Process));
        assert!(!basic.supports_domain(MonitoringDomain::Network));
        assert!(!basic.has_advanced_capabilities());
        let advanced = AdvancedCapabilities::full_featured();
        assert!(advanced.kernel_level && advanced.realtime && advanced.system_wide);
        let basic = AdvancedCapabilities::basic();
        assert!(!basic.kernel_level && !basic.realtime && basic.system_wide);
    }
}
