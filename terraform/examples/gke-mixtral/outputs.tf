output "kubeconfig_command" {
  description = "Run this to point kubectl at the new cluster."
  value       = module.cluster.kubeconfig_command
}

output "cluster_name" {
  description = "GKE cluster name."
  value       = module.cluster.cluster_name
}

output "models_storage_class" {
  description = "StorageClass of the model-weights PVC."
  value       = module.cluster.models_storage_class
}

output "api_key" {
  description = "Bearer token of the expertmesh OpenAI-compatible API (also in Secret expertmesh/expertmesh-api-key)."
  value       = module.expertmesh.api_key
  sensitive   = true
}

output "ray_auth_token" {
  description = "Token of Ray's token auth on the expertmesh Ray clusters (also in Secret expertmesh/expertmesh-ray-auth)."
  value       = module.expertmesh.ray_auth_token
  sensitive   = true
}

output "grafana_admin_password" {
  description = "Password of Grafana's admin user."
  value       = random_password.grafana_admin.result
  sensitive   = true
}

output "next_steps" {
  description = "Commands to reach expertmesh once the apply is done."
  value       = <<-EOT
    ${module.cluster.kubeconfig_command}
    kubectl -n expertmesh get rayservice
    kubectl -n expertmesh port-forward svc/expertmesh-serve-svc 8000:8000 &
    curl -H "Authorization: Bearer $(terraform output -raw api_key)" http://127.0.0.1:8000/v1/models
    # Grafana (user admin, password: terraform output -raw grafana_admin_password):
    kubectl -n monitoring port-forward svc/kube-prometheus-stack-grafana 3000:80
    # Ray's dashboard and job API take the token (export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=$(terraform output -raw ray_auth_token)):
    kubectl -n expertmesh port-forward svc/expertmesh-head-svc 8265:8265
  EOT
}
