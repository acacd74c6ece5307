locals {
  # "us-central1-a" is a zone (zonal cluster), "us-central1" a region.
  is_zonal = length(split("-", var.location)) == 3
  region   = local.is_zonal ? join("-", slice(split("-", var.location), 0, 2)) : var.location
}

resource "google_project_service" "apis" {
  for_each = toset([
    "compute.googleapis.com",
    "container.googleapis.com",
    "file.googleapis.com", # Filestore, behind the expertmesh-models StorageClass
  ])

  project = var.project_id
  service = each.key
  # Other workloads in the project may use these APIs too.
  disable_on_destroy = false
}

resource "google_compute_network" "this" {
  name                    = var.name
  project                 = var.project_id
  auto_create_subnetworks = false
  routing_mode            = "REGIONAL"

  depends_on = [google_project_service.apis]
}

# An explicit, logged copy of the implied deny-all-ingress rule, one priority
# above it: the implied rule cannot log, this one shows what was blocked. The
# allow rules GKE creates for nodes, pods and the control plane (priority 1000)
# still win.
resource "google_compute_firewall" "deny_ingress" {
  name      = "${var.name}-deny-ingress"
  project   = var.project_id
  network   = google_compute_network.this.id
  direction = "INGRESS"
  priority  = 65534

  source_ranges = ["0.0.0.0/0"]

  deny {
    protocol = "all"
  }

  log_config {
    metadata = "EXCLUDE_ALL_METADATA"
  }
}

resource "google_compute_subnetwork" "this" {
  name          = "${var.name}-nodes"
  project       = var.project_id
  region        = local.region
  network       = google_compute_network.this.id
  ip_cidr_range = var.subnet_cidr

  # Private nodes have no external IPs; this lets them reach Google APIs
  # (Artifact Registry, GCS model buckets) without the NAT.
  private_ip_google_access = true

  secondary_ip_range {
    range_name    = "pods"
    ip_cidr_range = var.pods_cidr
  }

  secondary_ip_range {
    range_name    = "services"
    ip_cidr_range = var.services_cidr
  }

  # Sampled flow logs: enough to debug connectivity without paying for every
  # NCCL/gRPC packet between GPU nodes.
  log_config {
    aggregation_interval = "INTERVAL_5_MIN"
    flow_sampling        = 0.1
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

# Private nodes reach the internet (Hugging Face, container registries) through
# Cloud NAT.
resource "google_compute_router" "this" {
  name    = var.name
  project = var.project_id
  region  = local.region
  network = google_compute_network.this.id
}

resource "google_compute_router_nat" "this" {
  name                               = var.name
  project                            = var.project_id
  region                             = local.region
  router                             = google_compute_router.this.name
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "ALL_SUBNETWORKS_ALL_IP_RANGES"

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}
