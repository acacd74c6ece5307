output "cluster_name" {
  description = "GKE cluster name."
  value       = google_container_cluster.this.name
}

output "cluster_endpoint" {
  description = "Public IP of the Kubernetes API endpoint (no scheme)."
  value       = google_container_cluster.this.endpoint
}

output "cluster_ca_certificate" {
  description = "Base64-encoded CA certificate of the API server, for provider configuration."
  value       = google_container_cluster.this.master_auth[0].cluster_ca_certificate
}

output "location" {
  description = "Region or zone of the cluster."
  value       = google_container_cluster.this.location
}

output "region" {
  description = "Region of the network and of the cluster."
  value       = local.region
}

output "project_id" {
  description = "GCP project of the cluster."
  value       = var.project_id
}

output "kubeconfig_command" {
  description = "Command that writes a kubeconfig entry for this cluster."
  value       = "gcloud container clusters get-credentials ${google_container_cluster.this.name} ${local.is_zonal ? "--zone" : "--region"} ${var.location} --project ${var.project_id}"
}

output "models_storage_class" {
  description = "Name of the ReadWriteMany (Filestore) StorageClass for the model-weights PVC."
  value       = kubernetes_storage_class.models.metadata[0].name
}

output "network_name" {
  description = "Name of the VPC network the cluster runs in."
  value       = google_compute_network.this.name
}

output "monitoring_namespace" {
  description = "Namespace of kube-prometheus-stack; Grafana dashboards ConfigMaps go here."
  value       = module.kuberay_stack.monitoring_namespace
}

output "gpu_node_pool_names" {
  description = "Names of the GPU node pools (also their expertmesh.io/pool label values)."
  value       = [for p in var.gpu_node_pools : p.name]
}
