locals {
  gpu_node_pools = { for p in var.gpu_node_pools : p.name => p }
}

resource "google_container_node_pool" "system" {
  name     = "system"
  project  = var.project_id
  location = var.location
  cluster  = google_container_cluster.this.name

  autoscaling {
    min_node_count = var.system_node_pool.min_size
    max_node_count = var.system_node_pool.max_size
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  node_config {
    machine_type    = var.system_node_pool.machine_type
    disk_size_gb    = var.system_node_pool.disk_size_gb
    disk_type       = "pd-balanced"
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    resource_labels = var.labels

    labels = {
      "expertmesh.io/pool" = "system"
    }

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
}

resource "google_container_node_pool" "gpu" {
  for_each = local.gpu_node_pools

  name           = each.key
  project        = var.project_id
  location       = var.location
  cluster        = google_container_cluster.this.name
  node_locations = each.value.node_locations

  # Counts across all zones of the pool; min may be 0 so idle GPU pools cost
  # nothing. GKE's autoscaler knows each pool's template and scales from zero.
  autoscaling {
    total_min_node_count = each.value.min_size
    total_max_node_count = each.value.max_size
    # Take capacity from whichever zone has it: GPUs are often short in one.
    location_policy = "ANY"
  }

  management {
    auto_repair  = true
    auto_upgrade = true
  }

  # A surge node would need one more (scarce) GPU machine; replace in place.
  upgrade_settings {
    strategy        = "SURGE"
    max_surge       = 0
    max_unavailable = 1
  }

  node_config {
    machine_type    = each.value.machine_type
    spot            = each.value.spot
    disk_size_gb    = each.value.disk_size_gb
    disk_type       = each.value.disk_type
    image_type      = "COS_CONTAINERD"
    service_account = google_service_account.nodes.email
    oauth_scopes    = ["https://www.googleapis.com/auth/cloud-platform"]
    resource_labels = var.labels

    # Our labels win over user labels so the pool selector in the KubeRay
    # manifests always matches.
    labels = merge(each.value.labels, {
      "expertmesh.io/pool"     = each.key
      "nvidia.com/gpu.present" = "true"
    })

    guest_accelerator {
      type  = each.value.accelerator_type
      count = each.value.accelerator_count

      # GKE installs the driver and the device plugin; no NVIDIA charts needed.
      gpu_driver_installation_config {
        gpu_driver_version = "LATEST"
      }
    }

    # nvidia.com/gpu=true:NoSchedule keeps CPU-only pods off GPU nodes.
    taint {
      key    = "nvidia.com/gpu"
      value  = "true"
      effect = "NO_SCHEDULE"
    }

    # A3 machines require gVNIC; it is the faster NIC on the others too.
    gvnic {
      enabled = true
    }

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

  lifecycle {
    # The autoscaler owns the node count.
    ignore_changes = [initial_node_count]
  }
}
