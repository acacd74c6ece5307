resource "google_service_account" "nodes" {
  project      = var.project_id
  account_id   = "${var.name}-nodes"
  display_name = "GKE nodes of ${var.name}"
}

# Least privilege for nodes instead of the Compute Engine default service
# account (project Editor): write logs/metrics, pull images.
resource "google_project_iam_member" "nodes" {
  for_each = toset([
    "roles/container.defaultNodeServiceAccount",
    "roles/artifactregistry.reader",
  ])

  project = var.project_id
  role    = each.key
  member  = "serviceAccount:${google_service_account.nodes.email}"
}

locals {
  accelerator_types = distinct([for p in var.gpu_node_pools : p.accelerator_type])
}

resource "google_container_cluster" "this" {
  # checkov:skip=CKV_GCP_61: intranode visibility sends pod-to-pod traffic on the same node through the VPC; expert dispatch between the 8 GPUs of one node would pay that hop on every MoE layer.
  # checkov:skip=CKV_GCP_66: binary authorization needs a project policy and attestors for the user-built expertmesh image; that is the platform team's choice, not this module's.
  # checkov:skip=CKV_GCP_65: RBAC through Google Groups needs a Google Workspace domain with a gke-security-groups group, which not every user has.
  name     = var.name
  project  = var.project_id
  location = var.location

  network    = google_compute_network.this.id
  subnetwork = google_compute_subnetwork.this.id

  # Node pools are managed below; the default pool only exists while the
  # cluster is created.
  remove_default_node_pool = true
  initial_node_count       = 1
  deletion_protection      = var.deletion_protection

  release_channel {
    channel = var.release_channel
  }
  min_master_version = var.min_master_version

  networking_mode = "VPC_NATIVE"
  ip_allocation_policy {
    cluster_secondary_range_name  = "pods"
    services_secondary_range_name = "services"
  }

  # Dataplane V2 (eBPF) enforces NetworkPolicy itself; the Calico-based
  # network_policy add-on must stay off alongside it.
  datapath_provider = "ADVANCED_DATAPATH"
  network_policy {
    enabled = false
  }

  private_cluster_config {
    enable_private_nodes    = true
    enable_private_endpoint = false
    master_ipv4_cidr_block  = var.master_ipv4_cidr_block
  }

  master_authorized_networks_config {
    dynamic "cidr_blocks" {
      for_each = var.master_authorized_networks
      content {
        cidr_block   = cidr_blocks.value.cidr_block
        display_name = cidr_blocks.value.display_name
      }
    }
  }

  master_auth {
    client_certificate_config {
      issue_client_certificate = false
    }
  }

  workload_identity_config {
    workload_pool = "${var.project_id}.svc.id.goog"
  }

  enable_shielded_nodes = true
  enable_legacy_abac    = false

  addons_config {
    gcp_filestore_csi_driver_config {
      enabled = true
    }
    gce_persistent_disk_csi_driver_config {
      enabled = true
    }
    http_load_balancing {
      disabled = false
    }
  }

  # Node auto-provisioning stays off (the pools are declared below), but the
  # resource limits still cap what the autoscaler may add across all pools.
  cluster_autoscaling {
    enabled             = false
    autoscaling_profile = var.autoscaling_profile

    resource_limits {
      resource_type = "cpu"
      minimum       = 0
      maximum       = var.max_total_cpu_cores
    }

    resource_limits {
      resource_type = "memory"
      minimum       = 0
      maximum       = var.max_total_memory_gb
    }

    dynamic "resource_limits" {
      for_each = local.accelerator_types
      content {
        resource_type = resource_limits.value
        minimum       = 0
        maximum       = var.max_total_gpus
      }
    }
  }

  logging_config {
    enable_components = ["SYSTEM_COMPONENTS", "WORKLOADS"]
  }

  monitoring_config {
    enable_components = ["SYSTEM_COMPONENTS"]
    # kube-prometheus-stack scrapes Ray and the GPUs; no second collector.
    managed_prometheus {
      enabled = false
    }
  }

  # Settings of the short-lived default pool, hardened like the real pools.
  node_config {
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    image_type      = "COS_CONTAINERD"
    metadata = {
      disable-legacy-endpoints = "true"
    }
    workload_metadata_config {
      mode = "GKE_METADATA"
    }
    shielded_instance_config {
      enable_secure_boot          = true
      enable_integrity_monitoring = true
    }
  }

  resource_labels = var.labels

  lifecycle {
    # The default pool is deleted after creation; its settings must not cause
    # a diff (and a cluster replacement) afterwards.
    ignore_changes = [node_config, initial_node_count]
  }

  depends_on = [google_project_service.apis, google_project_iam_member.nodes]
}
